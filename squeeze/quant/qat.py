"""QAT: quantization-aware fine-tuning with a straight-through estimator, distilled from the base model.

PTQ picks each Linear's numbers from local statistics; QAT then trains the whole quantized network
end to end, so the layers learn to compensate each other's rounding. Here:

- start: a PTQ method (`start: rtn | gptq`, or any per-layer method, e.g. awq) run in memory layer by
  layer exactly as the pipeline does; its dequantized weights become the latent weights (so step 0
  *is* the PTQ model) and its scales the initial, trainable scales;
- forward: every target Linear uses q = clamp(round(w/s + z)), ŵ = (q − z)·s with round's gradient
  passed straight through (STE) and the scale learned through the same expression (LSQ-style); scales
  are rounded to bf16 in the forward pass too, so the trained model is bit-identical to the export;
- loss: forward KL from the unquantized model's logits (`squeeze.distill.losses.logit_kd_loss`) plus
  `ce_weight` × next-token cross-entropy, on random windows of the training text (`corpus:train`);
- export: the learned integers and scales go through the same exporter as PTQ (compressed-tensors).

QAT is whole-model, not layer-by-layer: teacher, student, gradients and AdamW state (~24 bytes per
parameter) all live in memory at once, which is fine for the toy and small models. A model whose
estimate does not fit in the available memory is refused up front (use --method gptq / awq for those).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.checkpoint.reader import CheckpointReader
from squeeze.checkpoint.writer import CheckpointWriter, check_output_dir
from squeeze.console import make_progress
from squeeze.data import load_text
from squeeze.distill.losses import logit_kd_loss
from squeeze.distill.models import freeze, load_causal_lm
from squeeze.errors import SqueezeError
from squeeze.model.decoder import CausalLM
from squeeze.model.tokenizer import TOKENIZER_FILES, load_tokenizer
from squeeze.quant.calibration import InputStats, LayerCalibration, Target, check_finite, output_error
from squeeze.quant.export import choose_layout, export_tensors, quantization_config
from squeeze.quant.linear import QuantizedWeight
from squeeze.quant.methods import QuantMethod, register_method
from squeeze.quant.observers import SCALE_DTYPE, expand_qparam, fake_quantize_activations, quantize_weight
from squeeze.quant.pipeline import (
    QUANT_SHARD_BYTES,
    RECIPE_FILE,
    SUMMARY_FILE,
    LayerReport,
    QuantizeReport,
    calibration_batches,
    peak_rss_bytes,
    plan,
    proc_bytes,
    unquantized_dtype,
)
from squeeze.quant.scheme import QuantScheme
from squeeze.recipe import Recipe, Rule

BYTES_PER_PARAM = 24  # fp32 teacher + latent weights + gradients + two AdamW moments + slack


# ---- the method entry (recipes validate their params through it) -------------------------------------
@register_method
class QAT(QuantMethod):
    """`method: qat`. Params: steps, lr (latent weights; scales use lr × scale_lr), start (PTQ method) and
    start_params, kl_weight / ce_weight / temperature (loss), seq_len / batch_size / dataset (training
    windows), train_scales, seed."""

    name = "qat"

    def __init__(self, steps: int = 200, lr: float = 1e-3, start: str = "rtn", start_params: dict | None = None,
                 kl_weight: float = 1.0, ce_weight: float = 0.02, temperature: float = 1.0, seq_len: int = 128,
                 batch_size: int = 8, dataset: str = "corpus:train", train_scales: bool = True,
                 scale_lr: float = 0.1, seed: int = 0) -> None:
        super().__init__(steps=steps, lr=lr, start=start, start_params=start_params, kl_weight=kl_weight,
                         ce_weight=ce_weight, temperature=temperature, seq_len=seq_len, batch_size=batch_size,
                         dataset=dataset, train_scales=train_scales, scale_lr=scale_lr, seed=seed)
        self.steps, self.lr, self.start = int(steps), float(lr), str(start)
        self.start_params = dict(start_params or {})
        self.kl_weight, self.ce_weight, self.temperature = float(kl_weight), float(ce_weight), float(temperature)
        self.seq_len, self.batch_size, self.dataset = int(seq_len), int(batch_size), str(dataset)
        self.train_scales, self.scale_lr, self.seed = bool(train_scales), float(scale_lr), int(seed)
        if self.steps < 0 or self.seq_len < 2 or self.batch_size < 1:
            raise SqueezeError("qat: steps must be >= 0, seq_len >= 2, batch_size >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SqueezeError(f"qat: lr must be a positive number, got {lr}")
        if self.start == "qat":
            raise SqueezeError("qat: start must be a post-training method (rtn or gptq)")
        if not (self.temperature > 0 and self.kl_weight >= 0 and self.ce_weight >= 0
                and self.kl_weight + self.ce_weight > 0):
            raise SqueezeError("qat: temperature must be > 0, kl_weight and ce_weight >= 0 and not both 0")

    def quantize_layer(self, layer: nn.Module, calib: LayerCalibration,
                       targets: list[Target]) -> dict[str, QuantizedWeight]:
        raise SqueezeError("qat trains the whole model, not one layer: run it with `squeeze quantize --method qat` "
                           "or squeeze.api.quantize (a recipe with method: qat in every rule)")


# ---- fake quantization --------------------------------------------------------------------------------
def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _bf16_scale(s: torch.Tensor) -> torch.Tensor:
    """The stored (bf16) scale, positive."""
    return s.to(SCALE_DTYPE).float().clamp_min(torch.finfo(SCALE_DTYPE).tiny)


class FakeQuantLinear(nn.Module):
    """A Linear trained through its quantizer: latent fp32 weight, learnable scale, fixed zero point."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, train_scale: bool = True) -> None:
        super().__init__()
        args = qw.scheme.weights
        if args.type != "int" or args.strategy not in ("group", "channel"):
            raise SqueezeError(f"qat supports integer per-group / per-channel weights, not {args.describe()}")
        self.scheme: QuantScheme = qw.scheme
        self.weight = nn.Parameter(qw.dequantize().float())
        self.scale = nn.Parameter(qw.scale.float().clone(), requires_grad=train_scale)
        self.register_buffer("zero_point", None if qw.zero_point is None else qw.zero_point.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def fake_weight(self) -> torch.Tensor:
        args = self.scheme.weights
        s = self.scale + (_bf16_scale(self.scale) - self.scale).detach()
        shape = tuple(self.weight.shape)
        s_full = expand_qparam(s, shape, args)  # type: ignore[arg-type]
        z = 0.0 if self.zero_point is None else expand_qparam(self.zero_point, shape, args)  # type: ignore[arg-type]
        q = torch.clamp(_ste_round(self.weight / s_full + z), args.qmin, args.qmax)
        return (q - z) * s_full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.scheme.input_activations
        if acts is not None:
            x = x + (fake_quantize_activations(x, acts) - x).detach()
        return F.linear(x, self.fake_weight(), self.bias)

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        """The stored numbers: exactly what `fake_weight` computes."""
        s = _bf16_scale(self.scale.detach())
        zp = self.zero_point
        q = quantize_weight(self.weight.detach(), s, zp, self.scheme.weights)
        return QuantizedWeight.from_values(q, s, zp, self.scheme)


# ---- PTQ in memory ---------------------------------------------------------------------------------------
@dataclass
class StartResult:
    weights: dict[str, QuantizedWeight]  # full module name -> stored numbers
    reference: dict[str, torch.Tensor] = field(default_factory=dict)  # unquantized (possibly folded) weights
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def ptq_in_memory(model: CausalLM, reader: CheckpointReader, recipe: Recipe, batches: list[torch.Tensor],
                  apply: bool = True, keep_stats: bool = False) -> StartResult:
    """Run the recipe's per-layer methods on an in-memory model, layer by layer as the pipeline does
    (later layers calibrated on the outputs of quantized earlier ones). Folds (AWQ / SmoothQuant)
    rewrite the model in place; with `apply` the target weights are then replaced by their dequantized
    values, without it they stay float (the tests use that to check that folding is exact)."""
    targets, methods = plan(reader, recipe)
    result = StartResult({})
    hs = [model.model.embed_tokens(b) for b in batches]
    for i, layer in enumerate(model.model.layers):
        prefix = reader.layer_prefix(i)
        mine = [t for t in targets.values() if t.name.startswith(prefix)]
        for t in mine:
            t.module = layer.get_submodule(t.local)  # type: ignore[assignment]
        for j, h in enumerate(hs):
            check_finite(h, f"the input of layer {i} (batch {j})")
        calib = LayerCalibration(i, hs, lambda n: model.rope.get(0, n))
        calib.collect_hessians(layer, mine, observe_all_experts=recipe.calibration.observe_all_experts,
                               compute_dtype=recipe.calibration.torch_compute_dtype)
        for key, method in methods.items():
            group = [t for t in mine if t.method == key]
            if group:
                result.weights.update(method.quantize_layer(layer, calib, group))
        for t in mine:
            if keep_stats:
                result.reference[t.name] = t.module.weight.detach().clone()
                result.hessians[t.name] = calib.stats[t.name].hessian
            if apply:
                t.module.weight.data = result.weights[t.name].dequantize().to(t.module.weight.dtype)
            t.module = None  # type: ignore[assignment]
        hs = calib.run(layer, observe_all_experts=False)
    return result


# ---- training -----------------------------------------------------------------------------------------------
def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 when unknown: no check)."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def check_memory(reader: CheckpointReader) -> int:
    """Refuse a model whose teacher + student + optimizer state would not fit; returns the estimate."""
    params = sum(math.prod(reader.shape(n)) for n in reader.names)
    need = params * BYTES_PER_PARAM
    have = available_memory_bytes()
    if have and need > 0.9 * have:
        raise SqueezeError(f"qat holds the whole model in memory (teacher, student, gradients, optimizer: about "
                           f"{need / 1024**3:.1f} GiB for {params / 1e9:.2f}B parameters) but only "
                           f"{have / 1024**3:.1f} GiB is available; use a layer-by-layer method "
                           "(--method gptq or awq) for a model this size")
    return need


def qat_settings(recipe: Recipe) -> QAT:
    """The one QAT configuration of a recipe (every rule must be qat, with the same params)."""
    rules = recipe.rules
    if any(r.method != "qat" for r in rules):
        raise SqueezeError("a qat recipe must use method: qat in every rule (QAT trains all quantized Linears "
                           "together)")
    if any(json.dumps(r.params, sort_keys=True) != json.dumps(rules[0].params, sort_keys=True) for r in rules):
        raise SqueezeError("all qat rules of a recipe must have the same params")
    return QAT(**rules[0].params)


def start_recipe(recipe: Recipe, qat: QAT) -> Recipe:
    rules = [Rule(r.targets, r.scheme, qat.start, dict(qat.start_params), r.scheme_spec) for r in recipe.rules]
    return Recipe(rules, list(recipe.ignore), recipe.calibration)


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, steps // 20)
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def train_qat(student: CausalLM, teacher: CausalLM, train_ids: torch.Tensor, qat: QAT,
              on_step: Any = None) -> list[float]:
    """Fine-tune the fake-quantized student; returns the loss of every step."""
    latent = [m.weight for m in student.modules() if isinstance(m, FakeQuantLinear)]
    scales = [m.scale for m in student.modules() if isinstance(m, FakeQuantLinear) and m.scale.requires_grad]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in latent + scales:
        p.requires_grad_(True)
    groups = [{"params": latent, "lr": qat.lr}]
    if scales:
        groups.append({"params": scales, "lr": qat.lr * qat.scale_lr})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, max(qat.steps, 1)))
    gen = torch.Generator().manual_seed(qat.seed)
    if train_ids.numel() < qat.seq_len + 2:
        raise SqueezeError(f"qat: training text too short for windows of {qat.seq_len} tokens")
    losses: list[float] = []
    student.train()
    for step in range(qat.steps):
        starts = torch.randint(0, train_ids.numel() - qat.seq_len - 1, (qat.batch_size,), generator=gen)
        ids = torch.stack([train_ids[s:s + qat.seq_len] for s in starts.tolist()])
        with torch.no_grad():
            t_logits = teacher(ids)
        s_logits = student(ids)
        loss = qat.kl_weight * logit_kd_loss(s_logits, t_logits, qat.temperature)
        if qat.ce_weight:
            loss = loss + qat.ce_weight * F.cross_entropy(s_logits[:, :-1].flatten(0, 1).float(),
                                                          ids[:, 1:].flatten())
        if not torch.isfinite(loss):
            raise SqueezeError(f"qat: the loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(latent + scales, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    student.eval()
    return losses


def wrap_student(model: CausalLM, weights: dict[str, QuantizedWeight],
                 train_scales: bool) -> dict[str, FakeQuantLinear]:
    """Replace each quantized Linear of `model` by a FakeQuantLinear starting at its PTQ numbers."""
    out = {}
    for name, qw in weights.items():
        parent, _, child = name.rpartition(".")
        lin = model.get_submodule(name)
        fq = FakeQuantLinear(qw, lin.bias, train_scales)
        setattr(model.get_submodule(parent), child, fq)
        out[name] = fq
    return out


@dataclass
class QATReport(QuantizeReport):
    qat: dict[str, Any] = field(default_factory=dict)


def quantize_qat(model_dir: str | Path, out_dir: str | Path, recipe: Recipe, overwrite: bool = False,
                 show_progress: bool = False, max_shard_bytes: int = QUANT_SHARD_BYTES) -> QATReport:
    """QAT `model_dir` into `out_dir` (atomic write, same layout as PTQ); see the module docstring."""
    t_start = time.perf_counter()
    out = check_output_dir(out_dir, overwrite)
    model_dir = Path(model_dir)
    reader = CheckpointReader(model_dir)
    qat = qat_settings(recipe)
    check_memory(reader)
    start = start_recipe(recipe, qat)
    plan(reader, start)  # validate regexes, schemes and the start method before loading anything
    batches = calibration_batches(model_dir, recipe)
    tok = load_tokenizer(model_dir)
    train_ids = torch.tensor(tok.encode(load_text(qat.dataset)).ids)

    student = load_causal_lm(reader).eval()
    teacher = freeze(copy.deepcopy(student))
    t0 = time.perf_counter()
    begun = ptq_in_memory(student, reader, start, batches, apply=True, keep_stats=True)
    calibration_seconds = time.perf_counter() - t0
    fakes = wrap_student(student, begun.weights, qat.train_scales)

    progress = make_progress() if show_progress else None
    task = None
    if progress is not None:
        progress.start()
        task = progress.add_task("qat", total=qat.steps, info=f"from {qat.start}")

    def tick(step: int, loss: float) -> None:
        if progress is not None and task is not None:
            progress.update(task, completed=step + 1, info=f"loss {loss:.3f}")

    t1 = time.perf_counter()
    try:
        losses = train_qat(student, teacher, train_ids, qat, tick)
    finally:
        if progress is not None:
            progress.stop()
    train_seconds = time.perf_counter() - t1
    del teacher
    final = {n: m.export() for n, m in fakes.items()}

    cfg = reader.config
    layout = choose_layout([q.scheme for q in final.values()])
    report = QATReport(str(out), layout, {"qat": train_seconds, qat.start: calibration_seconds}, calibration_seconds,
                       0.0, 0, quantized_modules=len(final), calibration_tokens=sum(b.numel() for b in batches))
    report.qat = {"steps": qat.steps, "start": qat.start, "first_loss": losses[0] if losses else float("nan"),
                  "last_loss": losses[-1] if losses else float("nan")}
    unquantized = []
    state = student.state_dict()
    with CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        for i in range(cfg.num_hidden_layers):
            prefix = reader.layer_prefix(i)
            layer_linears = [prefix + n for n, m in student.model.layers[i].named_modules()
                             if isinstance(m, nn.Linear | FakeQuantLinear)]
            unquantized += [n for n in layer_linears if n not in final]
            errors = {n[len(prefix):]: output_error(begun.reference[n], q.dequantize(),
                                                     InputStats(begun.hessians[n], 1))
                      for n, q in final.items() if n.startswith(prefix)}
            report.layers.append(LayerReport(i, 0.0, errors))
        tensors = {}
        for name in reader.names:
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module in final:
                continue
            tensors[name] = state[name].detach().to(unquantized_dtype(reader, name))
        writer.add_many(tensors)
        for name, qw in final.items():
            writer.add_many(export_tensors(name, qw, layout))
        config = cfg.to_dict()
        config["quantization_config"] = quantization_config(layout, {n: q.scheme for n, q in final.items()},
                                                            unquantized)
        config["torch_dtype"] = "bfloat16"
        writer.set_config(config)
        for f in TOKENIZER_FILES:
            if (model_dir / f).exists():
                writer.add_file(f, model_dir / f)
        writer.add_file(RECIPE_FILE, recipe.to_yaml().encode())
        report.total_seconds = time.perf_counter() - t_start
        report.peak_rss_bytes = peak_rss_bytes()
        writer.add_file(SUMMARY_FILE, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    return report
