"""The sequential quantization pipeline: one pass over the checkpoint, one decoder layer at a time.

For layer i: read its tensors (FP8 blocks dequantized as read), build it in fp32, run the calibration
batches through it with every expert observing every token (input Hessians per target Linear; true
routing counts recorded), let each method pick the stored numbers of its targets, swap the Linears for
`QuantLinear`s, run the batches again with true routing to get layer i+1's inputs (so later layers are
calibrated on the outputs of the quantized ones), write the layer's tensors, free it. Peak memory is
one layer + its Hessians + the calibration activations, independent of depth. The output is written
by `CheckpointWriter` (temp dir + rename), so errors and Ctrl-C leave no partial OUT.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.checkpoint.reader import CheckpointReader
from squeeze.checkpoint.writer import CheckpointWriter, check_output_dir
from squeeze.console import make_progress
from squeeze.data import load_text, token_windows
from squeeze.errors import SqueezeError
from squeeze.model.decoder import DecoderLayer, build_layer
from squeeze.model.rope import RotaryTable
from squeeze.model.tokenizer import TOKENIZER_FILES, load_tokenizer
from squeeze.quant.calibration import LayerCalibration, Target, check_finite, output_error
from squeeze.quant.export import choose_layout, export_tensors, quantization_config
from squeeze.quant.linear import QuantizedWeight, QuantLinear
from squeeze.quant.methods import QuantMethod, get_method
from squeeze.quant.observers import check_shape
from squeeze.recipe import Recipe

RECIPE_FILE = "squeeze_recipe.yaml"
SUMMARY_FILE = "squeeze_quantize_summary.json"
QUANT_SHARD_BYTES = 512 * 1024**2  # the output buffer is part of peak memory: keep it well under a layer


@dataclass
class LayerReport:
    layer: int
    seconds: float
    errors: dict[str, float]  # relative output error per quantized Linear (local name)
    expert_tokens: list[int] | None = None

    @property
    def mean_error(self) -> float:
        return statistics.fmean(self.errors.values()) if self.errors else 0.0

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


@dataclass
class QuantizeReport:
    output: str
    layout: str
    method_seconds: dict[str, float]
    calibration_seconds: float
    total_seconds: float
    peak_rss_bytes: int
    layers: list[LayerReport] = field(default_factory=list)
    quantized_modules: int = 0
    calibration_tokens: int = 0

    def expert_coverage(self) -> dict[str, float] | None:
        """min / median / max of truly-routed calibration tokens per expert, over all MoE layers."""
        counts = [c for r in self.layers if r.expert_tokens for c in r.expert_tokens]
        if not counts:
            return None
        return {"min": min(counts), "median": statistics.median(counts), "max": max(counts)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["expert_coverage"] = self.expert_coverage()
        return d


def proc_bytes(path: str, field: str) -> int:
    """A `field: N kB` line of a /proc file in bytes; 0 where /proc is absent (the caller then skips its check)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """This process's VmHWM (ru_maxrss is inherited across exec, so it is not used)."""
    return proc_bytes("/proc/self/status", "VmHWM")


# ---- allocator ------------------------------------------------------------------------------------------
# glibc serves a large tensor from its own mmap only up to a threshold that, by default, grows to 32 MiB after
# the first large free; a layer's tensors then come from the heap, which fragments and keeps the resident set
# growing layer after layer. Pinning the threshold and trimming after each layer keeps peak memory flat
# (8-layer, 16-expert toy, GPTQ W4: peak RSS 1043 -> 995 MiB at the same speed; a 2 MiB threshold gives
# 960 MiB but costs 3% in page faults). No-ops without glibc.
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_LIBC: ctypes.CDLL | bool | None = None


def _glibc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC if _LIBC and hasattr(_LIBC, "malloc_trim") else None


def pin_mmap_threshold(nbytes: int = 4 * 1024**2) -> None:
    """Allocations above `nbytes` get their own mmap, returned to the OS as soon as they are freed."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)


def return_freed_memory() -> None:
    """Hand the finished layer's freed heap back to the OS before the next layer is read."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def linear_names(layer: nn.Module) -> list[str]:
    return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]


def _meta_layer(reader: CheckpointReader, i: int) -> DecoderLayer:
    with torch.device("meta"):
        return DecoderLayer(reader.config, i)


def plan(reader: CheckpointReader, recipe: Recipe) -> tuple[dict[str, Target], dict[str, QuantMethod]]:
    """Check the recipe against the model before any work: regexes, methods, shapes. Targets have no
    module yet (filled per layer)."""
    cfg = reader.config
    all_names: list[str] = []
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(cfg.num_hidden_layers):
        layer = _meta_layer(reader, i)
        for local in linear_names(layer):
            full = f"{reader.layer_prefix(i)}{local}"
            all_names.append(full)
            m = layer.get_submodule(local)
            shapes[full] = (m.out_features, m.in_features)
    recipe.check_matches(all_names)
    methods: dict[str, QuantMethod] = {}
    for r in recipe.rules:
        key = f"{r.method}:{json.dumps(r.params, sort_keys=True)}"
        if key not in methods:
            methods[key] = get_method(r.method, **r.params)
    targets: dict[str, Target] = {}
    for name in all_names:
        rule = recipe.rule_for(name)
        if rule is None:
            continue
        check_shape(shapes[name], rule.scheme.weights, name)
        if rule.scheme.input_activations is not None and rule.scheme.input_activations.strategy == "group":
            g = rule.scheme.input_activations.group_size or 1
            if shapes[name][1] % g:
                raise SqueezeError(f"activation group size {g} does not divide the input dimension "
                                   f"{shapes[name][1]} of {name}")
        key = f"{rule.method}:{json.dumps(rule.params, sort_keys=True)}"
        local = name.split(".", 3)[3]  # strip "model.layers.N."
        targets[name] = Target(name, local, None, rule.scheme, key, rule.params)  # type: ignore[arg-type]
    if not targets:
        raise SqueezeError("the recipe selects no Linear module to quantize")
    return targets, methods


def calibration_batches(model_dir: Path, recipe: Recipe) -> list[torch.Tensor]:
    """The recipe's calibration windows as [batch, seq_len] token-id batches (shared with QAT, which
    must see the same data as the post-training methods it is compared with)."""
    cal = recipe.calibration
    if cal.num_samples < 1 or cal.seq_len < 2:
        raise SqueezeError("--num-samples must be >= 1 and --seq-len >= 2")
    tok = load_tokenizer(model_dir)
    windows = token_windows(tok.encode(load_text(cal.dataset)).ids, cal.seq_len, cal.num_samples, cal.seed)
    return list(windows.split(cal.batch_size))


def unquantized_dtype(reader: CheckpointReader, name: str) -> torch.dtype:
    """Unquantized tensors keep fp32 where stored so (e.g. the router bias), else bf16."""
    return torch.float32 if name in reader and reader.stored_dtype(name) == "F32" else torch.bfloat16


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, recipe: Recipe, overwrite: bool = False,
                        show_progress: bool = True, max_shard_bytes: int = QUANT_SHARD_BYTES,
                        calibration_ids: torch.Tensor | None = None) -> QuantizeReport:
    """Quantize `model_dir` into `out_dir` following `recipe`; returns the run's report.

    `calibration_ids` ([W, T] token ids) replaces the recipe's dataset (e.g. for tokenizer-less
    checkpoints in benchmarks). Shards are flushed at `max_shard_bytes`, which bounds the output
    buffer's share of peak memory.
    """
    start = time.perf_counter()
    out = check_output_dir(out_dir, overwrite)
    pin_mmap_threshold()
    model_dir = Path(model_dir)
    reader = CheckpointReader(model_dir)
    cfg = reader.config
    targets, methods = plan(reader, recipe)
    layout = choose_layout([t.scheme for t in targets.values()])  # type: ignore[misc]
    if calibration_ids is not None:
        batches = list(calibration_ids.split(recipe.calibration.batch_size))
    else:
        batches = calibration_batches(model_dir, recipe)
    rope = RotaryTable(cfg)
    # the statistics pass runs its matmuls in this dtype; the pass computing the quantized layer's outputs
    # stays fp32: there every expert sees a different token count, and each new bf16 GEMM shape adds a
    # oneDNN primitive to a cache that grew the resident set by ~20 MiB per layer (for no measurable speed)
    compute_dtype = recipe.calibration.torch_compute_dtype
    report = QuantizeReport(str(out), layout, defaultdict(float), 0.0, 0.0, 0,
                            calibration_tokens=sum(b.numel() for b in batches))
    unquantized: list[str] = []

    progress = make_progress() if show_progress else None
    with CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        globals_ = ["model.embed_tokens.weight", "model.norm.weight"]
        if "lm_head.weight" in reader:
            globals_.append("lm_head.weight")
        top = reader.read(globals_, torch.float32)
        hs = [F.embedding(b, top["model.embed_tokens.weight"]) for b in batches]
        writer.add_many({n: t.to(unquantized_dtype(reader, n)) for n, t in top.items()})
        del top

        if progress is not None:
            progress.start()
            layer_task = progress.add_task("layers", total=cfg.num_hidden_layers, info=layout)
            module_task = progress.add_task("modules", total=0, info="")
            sample_task = progress.add_task("calibration", total=len(batches), info="")
        try:
            for i in range(cfg.num_hidden_layers):
                t0 = time.perf_counter()
                prefix = reader.layer_prefix(i)
                layer = build_layer(cfg, i, reader.read(reader.names_with_prefix(prefix), torch.float32)).eval()
                mine = [t for t in targets.values() if t.name.startswith(prefix)]
                for t in mine:
                    t.module = layer.get_submodule(t.local)  # type: ignore[assignment]
                unquantized += [f"{prefix}{n}" for n in linear_names(layer) if f"{prefix}{n}" not in targets]
                for j, h in enumerate(hs):
                    check_finite(h, f"the input of layer {i} (batch {j})")
                calib = LayerCalibration(i, hs, lambda n: rope.get(0, n))

                # 1. statistics: every target's input Hessian, every expert observing every token
                tc = time.perf_counter()
                if progress is not None:
                    progress.reset(sample_task, total=len(batches), info=f"layer {i}")

                def tick(j: int, tc: float = tc, i: int = i) -> None:
                    if progress is not None:
                        done = j + 1
                        rate = done * batches[0].shape[0] / max(time.perf_counter() - tc, 1e-9)
                        progress.update(sample_task, completed=done, info=f"layer {i}, {rate:.1f} samples/s")

                calib.collect_hessians(layer, mine, on_batch=tick,
                                       observe_all_experts=recipe.calibration.observe_all_experts,
                                       compute_dtype=compute_dtype)
                report.calibration_seconds += time.perf_counter() - tc

                # 2. methods choose the stored numbers
                chosen: dict[str, QuantizedWeight] = {}
                if progress is not None:
                    progress.reset(module_task, total=len(mine), info=f"layer {i}")
                for key, method in methods.items():
                    group = [t for t in mine if t.method == key]
                    if not group:
                        continue
                    tm = time.perf_counter()
                    for chunk in _chunks(group, len(group) if method.whole_layer else 8):
                        chosen.update(method.quantize_layer(layer, calib, chunk))
                        if progress is not None:
                            progress.advance(module_task, len(chunk))
                    report.method_seconds[method.name] += time.perf_counter() - tm

                # 3. errors, swap in QuantLinear, next layer's inputs from the quantized layer
                errors = {}
                for t in mine:
                    qw = chosen[t.name]
                    errors[t.local] = output_error(t.module.weight.data, qw.dequantize(), calib.stats[t.name])
                    parent_name, _, child = t.local.rpartition(".")
                    setattr(layer.get_submodule(parent_name), child, QuantLinear(qw, t.module.bias))
                    t.module = None  # type: ignore[assignment]
                counts = calib.expert_tokens
                calib.stats.clear()
                hs = calib.run(layer, observe_all_experts=False)

                # 4. write the layer: quantized tensors in the output layout, the rest as they are
                tensors: dict[str, torch.Tensor] = {}
                for local, tensor in layer.state_dict().items():
                    name = prefix + local
                    tensors[name] = tensor.to(unquantized_dtype(reader, name))
                for t in mine:
                    tensors.update(export_tensors(t.name, chosen[t.name], layout))
                writer.add_many(tensors)
                report.quantized_modules += len(mine)
                report.layers.append(LayerReport(i, time.perf_counter() - t0, errors,
                                                 counts.tolist() if counts is not None else None))
                del layer, chosen, tensors, calib
                return_freed_memory()
                if progress is not None:
                    progress.advance(layer_task)
        finally:
            if progress is not None:
                progress.stop()

        config = cfg.to_dict()
        config["quantization_config"] = quantization_config(
            layout, {n: t.scheme for n, t in targets.items()}, unquantized)  # type: ignore[misc]
        config["torch_dtype"] = "bfloat16"
        writer.set_config(config)
        for f in TOKENIZER_FILES:
            if (model_dir / f).exists():
                writer.add_file(f, model_dir / f)
        writer.add_file(RECIPE_FILE, recipe.to_yaml().encode())
        report.method_seconds = dict(report.method_seconds)
        report.total_seconds = time.perf_counter() - start
        report.peak_rss_bytes = peak_rss_bytes()
        writer.add_file(SUMMARY_FILE, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    return report


def _chunks(items: list[Target], n: int) -> list[list[Target]]:
    return [items[i:i + n] for i in range(0, len(items), n)]
