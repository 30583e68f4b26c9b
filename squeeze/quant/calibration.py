"""Calibration data of one decoder layer: its input hidden states and per-Linear input statistics.

`LayerCalibration` is what every method receives. It holds the layer's inputs (outputs of the
already-quantized previous layers) and can run the layer over them with hooks. `collect_hessians`
accumulates H = Σ xᵀx per target Linear (GPTQ uses it; the pipeline also uses it to report the
output error ‖XWᵀ − XŴᵀ‖² = tr(ΔW H ΔWᵀ) without keeping X). While it runs, every MoE layer has
`observe_all_experts` set, so every routed expert sees every calibration token for statistics only;
the tokens truly routed to each expert are recorded separately (`expert_tokens`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.model.moe import MoE


@dataclass
class Target:
    """One Linear to quantize: full checkpoint name (without `.weight`), local name in the layer, module."""

    name: str
    local: str
    module: nn.Linear
    scheme: object  # QuantScheme (kept loose to avoid an import cycle)
    method: str
    params: dict = field(default_factory=dict)


@dataclass
class InputStats:
    hessian: torch.Tensor  # Σ xᵀx over calibration tokens, fp32 [K, K]
    tokens: int


def check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise SqueezeError(f"calibration activations contain NaN or inf at {where}; "
                           "check the model weights and the calibration text")


class LayerCalibration:
    """The calibration batches entering one decoder layer, and helpers to run the layer over them."""

    def __init__(self, layer_index: int, inputs: list[torch.Tensor],
                 rotary: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.layer_index = layer_index
        self.inputs = inputs
        self._rotary = rotary
        self.stats: dict[str, InputStats] = {}
        self.expert_tokens: torch.Tensor | None = None  # tokens truly routed to each expert

    def run(self, layer: nn.Module, observe_all_experts: bool = True,
            on_batch: Callable[[int], None] | None = None,
            compute_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Forward every batch through `layer`; MoE layers see every token on every expert if asked.
        With `compute_dtype` the matmuls run under autocast in that dtype (bf16 matmuls are 2-3x faster
        than fp32 on CPUs with AVX512-BF16 / AMX, and on GPUs)."""
        moes = [m for m in layer.modules() if isinstance(m, MoE)]
        for m in moes:
            m.observe_all_experts = observe_all_experts
        outs: list[torch.Tensor] = []
        counts: torch.Tensor | None = None
        device = self.inputs[0].device.type if self.inputs else "cpu"
        cast = torch.autocast(device, dtype=compute_dtype, enabled=compute_dtype not in (None, torch.float32))
        try:
            with torch.no_grad(), cast:
                for j, h in enumerate(self.inputs):
                    cos, sin = self._rotary(h.shape[1])
                    outs.append(layer(h, cos, sin))
                    for m in moes:
                        if m.last_counts is not None:
                            counts = m.last_counts.clone() if counts is None else counts + m.last_counts
                    if on_batch is not None:
                        on_batch(j)
        finally:
            for m in moes:
                m.observe_all_experts = False
        if counts is not None:
            self.expert_tokens = counts
        return outs

    def collect_hessians(self, layer: nn.Module, targets: Iterable[Target],
                         on_batch: Callable[[int], None] | None = None,
                         observe_all_experts: bool = True,
                         compute_dtype: torch.dtype | None = None) -> dict[str, InputStats]:
        """Accumulate Σ xᵀx for each target's input over all batches (one pass, every expert observed
        unless `observe_all_experts` is off, when experts see only their routed tokens).

        Targets fed the very same input tensor (q_a / kv_a on the normed hidden states; with every
        expert observing, every expert's gate / up and the shared expert's on the MoE input) share one
        Hessian tensor, accumulated once per batch: one fp32 `addmm_` per distinct input. Sharing is
        re-checked on every batch and split (the sum so far copied) if inputs ever differ. The
        finiteness check runs once on each final Hessian: a NaN / inf input makes its diagonal non-finite.
        With `compute_dtype` (e.g. bf16) the layer's matmuls run in that dtype, but xᵀx is always an fp32
        product: rounding each batch's product to bf16 (~1e-3 relative per entry) made GPTQ's output error
        on the trained toy's layers 1.1-1.7x worse, while the bf16 forward itself changed it by <2%.
        """
        new = [t for t in targets if t.name not in self.stats]
        # per target: the name whose Hessian it currently shares (itself when it owns one)
        owner: dict[str, str] = {}
        seen: dict[int, tuple[torch.Tensor, str]] = {}  # this batch: id(input) -> (input, owner name)
        added: dict[str, torch.Tensor] = {}  # this batch: shared owner name -> the input it accumulated
        sharers: set[str] = set()  # owners whose Hessian other targets share
        handles = []
        for t in new:
            k = t.module.in_features
            self.stats[t.name] = InputStats(torch.zeros(k, k, dtype=torch.float32), 0)

            def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = t.name) -> None:
                raw = args[0]
                hit = seen.get(id(raw))
                if hit is not None and hit[0] is raw:  # same tensor as an earlier target in this batch
                    if owner.get(name) == hit[1]:
                        return  # already accumulated into the shared Hessian
                    if name not in owner:  # first batch: start sharing
                        owner[name] = hit[1]
                        self.stats[name] = self.stats[hit[1]]
                        sharers.add(hit[1])
                        return
                else:
                    hit = None
                if name in owner and owner[name] != name:  # was sharing, but its input differs now: split
                    shared = self.stats[owner[name]]
                    h = shared.hessian.clone()
                    x_owner = added.get(owner[name])
                    if x_owner is not None:  # the owner already added this batch, which is not ours
                        h.addmm_(x_owner.T, x_owner, alpha=-1.0)
                    self.stats[name] = InputStats(h, shared.tokens - (0 if x_owner is None else x_owner.shape[0]))
                owner[name] = name
                x = raw.detach().reshape(-1, raw.shape[-1]).float()
                s = self.stats[name]
                with torch.autocast(x.device.type, enabled=False):
                    s.hessian.addmm_(x.T, x)
                s.tokens += x.shape[0]
                if name in sharers:
                    added[name] = x
                if hit is None:
                    seen[id(raw)] = (raw, name)

            handles.append(t.module.register_forward_pre_hook(hook))

        def batch_done(j: int) -> None:
            seen.clear()
            added.clear()
            if on_batch is not None:
                on_batch(j)

        # This pass's layer outputs are discarded, and in a decoder layer the MLP's down projections feed
        # nothing but the layer output: their pre-hooks record the inputs, the products are skipped
        # (with every expert observing every token, that is a third of the experts' work).
        skipped = _down_projections(layer)
        for m in skipped:
            m.forward = functools.partial(_zeros_like_output, m.out_features)  # type: ignore[method-assign]
        try:
            self.run(layer, observe_all_experts=observe_all_experts, on_batch=batch_done,
                     compute_dtype=compute_dtype)
        finally:
            for h in handles:
                h.remove()
            for m in skipped:
                del m.forward
        checked: set[int] = set()
        for t in new:
            s = self.stats[t.name]
            if id(s) not in checked:
                check_finite(s.hessian, f"the input of {t.name}")
                checked.add(id(s))
        # separate InputStats objects sharing one Hessian tensor: methods may rebind `.hessian` per target
        # (AWQ / SmoothQuant folds) without touching the others
        for t in new:
            s = self.stats[t.name]
            self.stats[t.name] = InputStats(s.hessian, s.tokens)
        return self.stats

    def capture_inputs(self, layer: nn.Module, modules: dict[str, nn.Module]) -> dict[str, list[torch.Tensor]]:
        """Inputs of the given submodules for every batch (for methods that re-run parts of the layer,
        e.g. AWQ's scale search). Memory is the caller's responsibility: capture only what you need."""
        cache: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        handles = [m.register_forward_pre_hook(
            lambda _m, a, n=n: cache[n].append(a[0].detach())) for n, m in modules.items()]
        try:
            self.run(layer, observe_all_experts=True)
        finally:
            for h in handles:
                h.remove()
        return cache


def _down_projections(layer: nn.Module) -> list[nn.Linear]:
    from squeeze.model.decoder import DecoderLayer

    if not isinstance(layer, DecoderLayer):
        return []
    return [m for n, m in layer.mlp.named_modules()
            if isinstance(m, nn.Linear) and n.rpartition(".")[2] == "down_proj" and "forward" not in m.__dict__]


def _zeros_like_output(out_features: int, x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(1).expand(*x.shape[:-1], out_features)  # no memory: the product is never read


def output_error(w: torch.Tensor, w_hat: torch.Tensor, stats: InputStats) -> float:
    """Relative output error ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² on the calibration inputs, from H = XᵀX."""
    d = (w.float() - w_hat.float())
    num = float((d @ stats.hessian * d).sum())
    den = float((w.float() @ stats.hessian * w.float()).sum())
    return num / den if den > 0 else 0.0
