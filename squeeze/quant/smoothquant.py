"""SmoothQuant (Xiao et al., 2022): W8A8-INT8 with activation outliers migrated into the weights.

Per-token int8 activations lose the small channels of a token whose range is set by a few outlier
channels. SmoothQuant divides each input channel by s_j = max|X_j|^α / max|W_j|^(1-α) (W: every
consumer Linear's column j) and folds the division into the preceding op (`squeeze.quant.folding`,
the same groups as AWQ, router compensated), multiplying the weights' columns by s_j: activations
become flatter, weights a little less so, and int8 handles both. α = 0.5 (the paper's default)
balances the two; `alpha: search` tries α on a grid (and no smoothing at all) and keeps, per fold
group, the one whose W8A8 sub-block output error on the calibration data is least. The run-time
per-token dynamic activation quantization is the scheme's (`W8A8_INT8`), applied by `QuantLinear` /
`QuantizedRuntime` and vLLM alike. The weights are then quantized by RTN or, with `weights: gptq`
(`--method smoothquant+gptq`), by GPTQ on the smoothed Hessian.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.quant.awq import rtn_dequantized, target_sets
from squeeze.quant.calibration import LayerCalibration, Target
from squeeze.quant.folding import FoldGroup, LayerFolds, fold_groups, usable_groups
from squeeze.quant.gptq import gptq_quantize
from squeeze.quant.linear import QuantizedWeight
from squeeze.quant.methods import QuantMethod, register_method
from squeeze.quant.observers import fake_quantize_activations
from squeeze.quant.rtn import rtn_quantize
from squeeze.quant.scheme import QuantScheme


def parse_alpha(alpha: Any) -> float | None:
    """A migration strength in [0, 1], or None for 'search'."""
    if isinstance(alpha, str) and alpha.strip().lower() == "search":
        return None
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise SqueezeError(f"smoothquant: alpha must be a number in [0, 1] or 'search', got {alpha!r}") from None
    if not (0.0 <= a <= 1.0):  # also rejects NaN
        raise SqueezeError(f"smoothquant: alpha must be in [0, 1] (or 'search'), got {alpha}")
    return a


def smoothing_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α) per channel; channels without signal keep s = 1."""
    live = (x_max > 0) & (w_max > 0)
    s = x_max.clamp_min(1e-8).pow(alpha) / w_max.clamp_min(1e-8).pow(1 - alpha)
    return torch.where(live, s.clamp(1e-5, 1e5), torch.ones_like(s))


@register_method
class SmoothQuant(QuantMethod):
    """`method: smoothquant`. Params: alpha (0.5, or 'search'), n_grid (alphas tried by the search),
    weights ('rtn' or 'gptq') and GPTQ's block_size / damp / act_order, min_tokens (routed experts
    with fewer calibration tokens use all tokens), fold_value_output (kv_b value rows → o_proj)."""

    name = "smoothquant"
    whole_layer: ClassVar[bool] = True
    default_weights: ClassVar[str] = "rtn"

    def __init__(self, alpha: float | str = 0.5, n_grid: int = 20, weights: str | None = None,
                 block_size: int = 128, damp: float = 0.01, act_order: bool = False, min_tokens: int = 16,
                 fold_value_output: bool = True) -> None:
        weights = weights or self.default_weights
        super().__init__(alpha=alpha, n_grid=n_grid, weights=weights, block_size=block_size, damp=damp,
                         act_order=act_order, min_tokens=min_tokens, fold_value_output=fold_value_output)
        self.alpha = parse_alpha(alpha)
        if weights not in ("rtn", "gptq"):
            raise SqueezeError(f"smoothquant: weights must be 'rtn' or 'gptq', got {weights!r}")
        if int(n_grid) < 1:
            raise SqueezeError("smoothquant: n_grid must be >= 1")
        self.n_grid, self.weights = int(n_grid), weights
        self.gptq = {"block_size": int(block_size), "damp": float(damp), "act_order": bool(act_order)}
        self.min_tokens, self.fold_vo = int(min_tokens), bool(fold_value_output)
        self.chosen: dict[str, float] = {}  # fold group (full name) -> alpha used (-1: no smoothing)

    def _act_quant(self, g: FoldGroup, mine: dict[str, Target]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        out = {}
        for n in g.linears:
            if n in mine:
                acts = mine[n].scheme.input_activations  # type: ignore[attr-defined]
                out[n] = lambda x, acts=acts: fake_quantize_activations(x, acts)
        return out

    def choose(self, folds: LayerFolds, g: FoldGroup, mine: dict[str, Target]) -> tuple[float, torch.Tensor]:
        layer = folds.layer
        _, x_max = folds.channel_stats(g)
        w_max = torch.stack([layer.get_submodule(n).weight.data.abs().amax(0) for n in g.linears]).amax(0)
        if self.alpha is not None:
            return self.alpha, smoothing_scale(x_max, w_max, self.alpha)
        inputs = folds.group_inputs(g)
        reference = folds.outputs(g, inputs)

        def fq(name: str, w: torch.Tensor) -> torch.Tensor:
            return rtn_dequantized(w, mine[name].scheme) if name in mine else w  # type: ignore[arg-type]

        acts = self._act_quant(g, mine)
        best = (math.inf, -1.0, torch.ones_like(x_max))
        for a in [-1.0] + [i / self.n_grid for i in range(self.n_grid + 1)]:
            s = torch.ones_like(x_max) if a < 0 else smoothing_scale(x_max, w_max, a)
            err = folds.error(g, inputs, reference, s, fq, acts)
            if err < best[0]:
                best = (err, a, s)
        return best[1], best[2]

    def quantize_layer(self, layer: nn.Module, calib: LayerCalibration,
                       targets: list[Target]) -> dict[str, QuantizedWeight]:
        if not targets:
            return {}
        for t in targets:
            s: QuantScheme = t.scheme  # type: ignore[assignment]
            if s.input_activations is None:
                raise SqueezeError(f"smoothquant needs a scheme that quantizes activations (e.g. W8A8_INT8); "
                                   f"{t.name} has {s.describe()}")
        mine, others, prefix = target_sets(calib, targets)
        groups = usable_groups(layer, fold_groups(layer, self.fold_vo), set(mine), others)
        folds = LayerFolds(layer, calib, groups, self.min_tokens)
        for g in groups:
            a, scale = self.choose(folds, g, mine)
            self.chosen[prefix + g.key] = a
            if a >= 0:
                folds.apply(g, scale, prefix)
        out = {}
        for t in targets:
            w = t.module.weight.data
            if self.weights == "gptq":
                out[t.name] = gptq_quantize(w, calib.stats[t.name].hessian, t.scheme,  # type: ignore[arg-type]
                                            **self.gptq)
            else:
                out[t.name] = rtn_quantize(w, t.scheme)  # type: ignore[arg-type]
        return out


@register_method
class SmoothQuantGPTQ(SmoothQuant):
    """`method: smoothquant+gptq`: SmoothQuant's smoothing, then GPTQ for the weights."""

    name = "smoothquant+gptq"
    default_weights = "gptq"
