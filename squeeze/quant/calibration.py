"""Calibration data of one decoder layer: its input hidden states and per-Linear input statistics.

`LayerCalibration` is what every method receives. It holds the layer's inputs (outputs of the
already-quantized previous layers) and can run the layer over them with hooks. `collect_hessians`
accumulates H = Σ xᵀx per target Linear (GPTQ uses it; the pipeline also uses it to report the
output error ‖XWᵀ − XŴᵀ‖² = tr(ΔW H ΔWᵀ) without keeping X). While it runs, every MoE layer has
`observe_all_experts` set, so every routed expert sees every calibration token for statistics only;
the tokens truly routed to each expert are recorded separately (`expert_tokens`).
"""

from __future__ import annotations

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
            on_batch: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Forward every batch through `layer`; MoE layers see every token on every expert if asked."""
        moes = [m for m in layer.modules() if isinstance(m, MoE)]
        for m in moes:
            m.observe_all_experts = observe_all_experts
        outs: list[torch.Tensor] = []
        counts: torch.Tensor | None = None
        try:
            with torch.no_grad():
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
                         observe_all_experts: bool = True) -> dict[str, InputStats]:
        """Accumulate Σ xᵀx for each target's input over all batches (one pass, every expert observed
        unless `observe_all_experts` is off, when experts see only their routed tokens)."""
        handles = []
        for t in targets:
            if t.name in self.stats:
                continue
            k = t.module.in_features
            self.stats[t.name] = InputStats(torch.zeros(k, k, dtype=torch.float32), 0)

            def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = t.name) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                check_finite(x, f"the input of {name}")
                s = self.stats[name]
                s.hessian.addmm_(x.T, x)
                s.tokens += x.shape[0]

            handles.append(t.module.register_forward_pre_hook(hook))
        try:
            self.run(layer, observe_all_experts=observe_all_experts, on_batch=on_batch)
        finally:
            for h in handles:
                h.remove()
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


def output_error(w: torch.Tensor, w_hat: torch.Tensor, stats: InputStats) -> float:
    """Relative output error ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² on the calibration inputs, from H = XᵀX."""
    d = (w.float() - w_hat.float())
    num = float((d @ stats.hessian * d).sum())
    den = float((w.float() @ stats.hessian * w.float()).sum())
    return num / den if den > 0 else 0.0
