"""Lazy, by-name access to a sharded safetensors checkpoint.

Nothing is loaded when a checkpoint is opened: we read config.json, the index and every shard's
header (cheap, and it catches missing, truncated and corrupt shards before any work starts). Tensors
are read on demand, one layer's worth at a time, and each read opens and closes its shard so that no
memory map keeps earlier layers resident: peak memory stays about one layer, whatever the depth.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from squeeze.checkpoint.config import ModelConfig, load_config
from squeeze.checkpoint.fp8 import FP8_DTYPE, dequantize_fp8_block
from squeeze.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # DeepSeek: `x.weight` (fp8) + `x.weight_scale_inv` (fp32)


class CheckpointReader:
    """A checkpoint directory: its config and its tensors, read lazily by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.path}")
        self.config: ModelConfig = load_config(self.path)
        self.weight_map: dict[str, str] = self._read_weight_map()
        self._headers: dict[str, tuple[str, list[int]]] = {}
        self._check_shards()

    # ---- discovery --------------------------------------------------------------------------
    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.exists():
            try:
                data = json.loads(index.read_text())
                weight_map = data["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: empty weight_map")
            return {str(k): str(v) for k, v in weight_map.items()}
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"no *.safetensors files and no {INDEX_NAME} in {self.path}")
        # No index: every shard's header says what it holds.
        weight_map: dict[str, str] = {}
        for shard in shards:
            for name in self._open_keys(shard):
                weight_map[name] = shard
        return weight_map

    def _open_keys(self, shard: str) -> list[str]:
        with self._open(shard) as f:
            return list(f.keys())

    def _open(self, shard: str):  # noqa: ANN202 - safetensors' handle type is private
        file = self.path / shard
        if not file.exists():
            raise CheckpointError(f"missing shard {shard} (listed in {INDEX_NAME} of {self.path})")
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"corrupt or truncated safetensors file {file}: {e}") from None

    def _check_shards(self) -> None:
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name, shard in self.weight_map.items():
            by_shard[shard].append(name)
        for shard, names in sorted(by_shard.items()):
            with self._open(shard) as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"tensor {name} is listed in {INDEX_NAME} but missing from {shard}")
                    sl = f.get_slice(name)
                    self._headers[name] = (sl.get_dtype(), list(sl.get_shape()))

    # ---- queries ----------------------------------------------------------------------------
    @property
    def raw_names(self) -> list[str]:
        """Every tensor stored on disk, scale tensors included."""
        return list(self.weight_map)

    @property
    def names(self) -> list[str]:
        """Logical tensor names: stored names less the FP8 scale companions."""
        if is_compressed_tensors(self.config):
            return compressed_logical_names(self.weight_map)
        return [n for n in self.weight_map if not n.endswith(SCALE_SUFFIX)]

    @property
    def shard_files(self) -> list[str]:
        """Shard file names in order (the index names them model-0000k-of-0000n)."""
        return sorted(set(self.weight_map.values()))

    def names_in_shard(self, shard: str) -> list[str]:
        return [n for n, s in self.weight_map.items() if s == shard]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> list[int]:
        return list(self._headers[name][1])

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype string (e.g. 'BF16', 'F8_E4M3', 'I32') of a stored tensor."""
        return self._headers[name][0]

    def storage_format(self, name: str) -> str:
        """What a logical tensor is stored as: 'bf16', 'fp32', 'fp8-block', 'int4-packed', ..."""
        if name + SCALE_SUFFIX in self.weight_map:
            return "fp8-block"
        dtype = self.stored_dtype(name)
        if name.endswith("weight_packed"):
            return "int4-packed"
        return {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F8_E4M3": "fp8", "I8": "int8",
                "I32": "int32", "I64": "int64"}.get(dtype, dtype.lower())

    def file_size(self) -> int:
        """Bytes on disk of every shard (what a user pays for storage)."""
        return sum((self.path / s).stat().st_size for s in self.shard_files)

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def names_with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self.names if n.startswith(prefix)]

    # ---- reads ------------------------------------------------------------------------------
    def read_raw(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Stored tensors exactly as on disk, each shard opened once for the whole request."""
        names = list(names)
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"tensor {name} not found in checkpoint {self.path}")
            by_shard[self.weight_map[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        for shard, shard_names in by_shard.items():
            with self._open(shard) as f:
                for name in shard_names:
                    try:
                        out[name] = f.get_tensor(name)
                    except (SafetensorError, OSError, ValueError) as e:
                        raise CheckpointError(f"cannot read {name} from {shard}: {e}") from None
        return {n: out[n] for n in names}

    def read(self, names: Iterable[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Logical tensors in `dtype`, FP8 blocks dequantized on the fly (never a full bf16 copy)."""
        names = list(names)
        if is_compressed_tensors(self.config):
            return read_compressed(self, names, dtype)
        scale_names = [n + SCALE_SUFFIX for n in names if n + SCALE_SUFFIX in self.weight_map]
        raw = self.read_raw(names + scale_names)
        block = self.config.fp8_block_size
        out: dict[str, torch.Tensor] = {}
        for name in names:
            t = raw[name]
            scale = raw.get(name + SCALE_SUFFIX)
            if scale is not None:
                if t.dtype != FP8_DTYPE:
                    raise CheckpointError(f"tensor {name} has a {SCALE_SUFFIX} but is stored as {t.dtype}, not fp8")
                try:
                    t = dequantize_fp8_block(t, scale, block, dtype)
                except ValueError as e:
                    raise CheckpointError(f"tensor {name}: {e}") from None
            elif t.dtype == FP8_DTYPE:
                raise CheckpointError(f"tensor {name} is stored as fp8 without a {name}{SCALE_SUFFIX} scale")
            elif not t.is_floating_point():
                raise CheckpointError(f"tensor {name} has dtype {t.dtype}; squeeze expects floating-point weights")
            else:
                # always a copy: a tensor already in `dtype` would otherwise be a view of safetensors'
                # file mapping and keep every page read so far resident for as long as it lives
                t = t.to(dtype, copy=True)
            out[name] = t
        return out

    def read_one(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.read([name], dtype)[name]


# ---- compressed-tensors checkpoints (written by `squeeze quantize`, llm-compressor, ...) ----------------
# A quantized Linear `m` is stored as `m.weight_packed` (int4/int8 packed in int32) or `m.weight` (int8 /
# fp8) with `m.weight_scale` (+ `m.weight_zero_point`, `m.weight_shape`); its logical name stays
# `m.weight`, decoded on read by compressed-tensors' own compressors, so that LayerwiseModel, perplexity
# and the quantization pipeline run such checkpoints unchanged.
CT_COMPANIONS = (".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx", ".input_scale",
                 ".input_zero_point", ".input_global_scale", ".weight_global_scale")


def is_compressed_tensors(config: ModelConfig) -> bool:
    return (config.quantization_config or {}).get("quant_method") == "compressed-tensors"


def compressed_logical_names(weight_map: dict[str, str]) -> list[str]:
    out = []
    for n in weight_map:
        if n.endswith(CT_COMPANIONS):
            continue
        out.append(n[: -len("_packed")] if n.endswith(".weight_packed") else n)
    return out


_CT_CONFIGS: dict[int, tuple[ModelConfig, object]] = {}


def _ct_scheme_for(config: ModelConfig, module: str):  # noqa: ANN202 - compressed_tensors' pydantic model
    import re

    from compressed_tensors.quantization import QuantizationConfig

    qc = _CT_CONFIGS.get(id(config))
    if qc is None or qc[0] is not config:  # parse once per config object, not once per tensor
        qc = _CT_CONFIGS[id(config)] = (config, QuantizationConfig.model_validate(config.quantization_config))
    for group in qc[1].config_groups.values():
        for t in group.targets:
            if (t.startswith("re:") and re.match(t[3:], module)) or t == "Linear" or module.endswith(t):
                return group
    raise CheckpointError(f"{module} is stored quantized but no quantization_config group targets it")


def read_compressed(reader: CheckpointReader, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`read` for compressed-tensors checkpoints: quantized weights dequantized in fp32, then cast."""
    from compressed_tensors.compressors import BaseCompressor

    out: dict[str, torch.Tensor] = {}
    for name in names:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        packed = module is not None and f"{module}.weight_packed" in reader.weight_map
        scaled = module is not None and f"{module}.weight_scale" in reader.weight_map
        if not (packed or scaled):
            t = reader.read_raw([name])[name]
            if not t.is_floating_point():
                raise CheckpointError(f"tensor {name} has dtype {t.dtype}; squeeze expects floating-point weights")
            out[name] = t.to(dtype, copy=True)  # not a view of the file mapping (see `read`)
            continue
        stored = [f"{module}{s}" for s in (".weight_packed", ".weight", ".weight_scale", ".weight_zero_point",
                                           ".weight_shape") if f"{module}{s}" in reader.weight_map]
        raw = reader.read_raw(stored)
        state = {k[len(module) + 1:]: v for k, v in raw.items()}
        state["weight_scale"] = state["weight_scale"].float()
        scheme = _ct_scheme_for(reader.config, module)
        fmt = scheme.format or reader.config.quantization_config.get("format")
        try:
            w = BaseCompressor.get_value_from_registry(fmt).decompress(state, scheme)["weight"]
        except Exception as e:  # noqa: BLE001 - any decoding failure is a corrupt checkpoint to the user
            raise CheckpointError(f"cannot decode quantized tensor {name} ({fmt}): {e}") from None
        out[name] = w.to(dtype)
    return out


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a checkpoint directory; raises `CheckpointError` / `ConfigError` with one clear line."""
    return CheckpointReader(path)
