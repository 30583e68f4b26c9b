"""Output layouts: compressed-tensors (what vLLM and transformers read) and DeepSeek's own block FP8.

- `deepseek-fp8`: chosen when every quantized Linear uses the FP8 block scheme. `x.weight` float8_e4m3fn
  + `x.weight_scale_inv` fp32 per 128x128 block and DeepSeek's `quantization_config`; a drop-in
  DeepSeek checkpoint that squeeze's reader dequantizes bit-exactly.
- `compressed-tensors`: everything else (and mixed recipes, FP8 block included as `float-quantized`
  with a block strategy). The per-module tensors come from compressed-tensors' own compressors
  (`pack-quantized` packs int4 to int32 with `weight_packed`/`weight_scale`/`weight_zero_point`/
  `weight_shape`; `int-quantized`; `float-quantized`), the config block from its pydantic models.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

from squeeze.checkpoint.fp8 import DEFAULT_BLOCK
from squeeze.quant.linear import QuantizedWeight
from squeeze.quant.observers import SCALE_DTYPE
from squeeze.quant.scheme import QuantScheme

DEEPSEEK_FP8 = "deepseek-fp8"
COMPRESSED_TENSORS = "compressed-tensors"
DEEPSEEK_FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": list(DEFAULT_BLOCK)}


def choose_layout(schemes: list[QuantScheme]) -> str:
    blocks = [s.is_fp8_block and tuple(s.weights.block_structure or ()) == DEFAULT_BLOCK for s in schemes]
    return DEEPSEEK_FP8 if schemes and all(blocks) else COMPRESSED_TENSORS


def _ct_scheme(scheme: QuantScheme) -> Any:
    return scheme.to_ct(targets=["Linear"])


def export_tensors(name: str, qw: QuantizedWeight, layout: str) -> dict[str, torch.Tensor]:
    """Stored tensors of one quantized Linear `name` (module name, no `.weight`)."""
    if layout == DEEPSEEK_FP8:
        return {f"{name}.weight": qw.q, f"{name}.weight_scale_inv": qw.scale.float()}
    from compressed_tensors.compressors import BaseCompressor

    scheme = _ct_scheme(qw.scheme)
    compressor = BaseCompressor.get_value_from_registry(qw.scheme.ct_format)
    state: dict[str, torch.Tensor] = {"weight": qw.dequantize(), "weight_scale": qw.scale.float()}
    if qw.zero_point is not None:
        state["weight_zero_point"] = qw.zero_point
    out = compressor.compress(state, scheme)
    if qw.scheme.weights.type == "int":
        out["weight_scale"] = out["weight_scale"].to(SCALE_DTYPE)  # exact: scales are bf16-rounded
    return {f"{name}.{k}": v for k, v in out.items()}


def compact_targets(groups: dict[int, list[str]]) -> dict[int, list[str]]:
    """Regex targets per group: layer/expert numbers folded to \\d+ where that stays unambiguous."""
    folded: dict[str, set[int]] = defaultdict(set)
    for g, names in groups.items():
        for n in names:
            folded[re.sub(r"\d+", "#", n)].add(g)
    out: dict[int, list[str]] = defaultdict(list)
    for g, names in groups.items():
        seen: set[str] = set()
        for n in names:
            key = re.sub(r"\d+", "#", n)
            if len(folded[key]) == 1:
                if key not in seen:
                    seen.add(key)
                    out[g].append("re:^" + re.escape(key).replace("\\#", "#").replace("#", r"\d+") + "$")
            else:
                out[g].append("re:^" + re.escape(n) + "$")
    return dict(out)


def quantization_config(layout: str, assigned: dict[str, QuantScheme], unquantized: list[str]) -> dict[str, Any]:
    """The `quantization_config` block for config.json."""
    if layout == DEEPSEEK_FP8:
        qc: dict[str, Any] = dict(DEEPSEEK_FP8_CONFIG)
        if unquantized:
            qc["modules_to_not_convert"] = sorted(unquantized)
        return qc
    from compressed_tensors.quantization import QuantizationConfig

    schemes: list[QuantScheme] = []
    groups: dict[int, list[str]] = defaultdict(list)
    for name, s in assigned.items():
        if s not in schemes:
            schemes.append(s)
        groups[schemes.index(s)].append(name)
    targets = compact_targets(groups)
    config_groups = {f"group_{i}": s.to_ct(targets=targets[i]) for i, s in enumerate(schemes)}
    formats = {s.ct_format for s in schemes}
    qc_obj = QuantizationConfig(config_groups=config_groups, quant_method="compressed-tensors",
                                format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                quantization_status="compressed", ignore=["lm_head"])
    return qc_obj.model_dump(exclude_none=True)
