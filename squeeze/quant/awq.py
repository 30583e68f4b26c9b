"""AWQ (Lin et al., 2023): activation-aware weight quantization, for DeepSeek's MLA + MoE layers.

A few input channels carry much larger activations than the rest; their weight columns matter most,
and rounding them coarsely costs the most output error. AWQ scales those columns up before quantizing
(relatively finer steps for them) and divides the activations by the same scale, folded into the op
that produces them (`squeeze.quant.folding`), so the unquantized model is unchanged. Per fold group:

1. per-input-channel mean |x| over the group's calibration tokens (a routed expert's down_proj: the
   tokens routed to it);
2. grid search over the exponent a of s = mean|x|^a / mean|ŵ|^(1-a) ("duo" scaling; ŵ = |w| relative to
   its quantization group's max), the identity included: keep the s whose quantize-dequantized group
   gives the smallest output error of the inspected sub-block (whole attention, whole MoE with true
   routing, or the Linear);
3. fold s; then per Linear, a clipping search: shrink each quantization group's range by up to
   `max_shrink`, keeping the ratio with the least output error tr(ΔW H ΔWᵀ) on that group's inputs.

The MoE fold is one scale for the router, every expert and the shared expert (they read the same
normalised hidden state); the router is compensated, so routing is untouched. Everything for one layer
happens in one `quantize_layer` call (`whole_layer`), since a fold spans many targets.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.quant.calibration import LayerCalibration, Target
from squeeze.quant.folding import FoldGroup, LayerFolds, fold_groups, usable_groups
from squeeze.quant.linear import QuantizedWeight
from squeeze.quant.methods import QuantMethod, register_method
from squeeze.quant.observers import (
    dequantize_weight,
    fake_quantize,
    minmax_qparams,
    quantize_weight,
    weight_qparams,
)
from squeeze.quant.scheme import QuantArgs, QuantScheme


def rtn_dequantized(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of a weight (what the scale search compares)."""
    scale, zp = weight_qparams(w, scheme.weights)
    return dequantize_weight(quantize_weight(w, scale, zp, scheme.weights), scale, zp, scheme.weights)


def check_awq_scheme(scheme: QuantScheme, name: str, method: str = "awq") -> None:
    args = scheme.weights
    if args.type != "int" or args.strategy not in ("group", "channel"):
        raise SqueezeError(f"{method} needs integer per-group or per-channel weights; {name} has {args.describe()}")


def weight_salience(weights: list[torch.Tensor], args: QuantArgs) -> torch.Tensor:
    """Mean over output rows of |w| relative to its quantization group's max, per input channel."""
    rows = []
    for w in weights:
        n, k = w.shape
        g = int(args.group_size) if args.strategy == "group" else k
        v = w.abs().reshape(n, k // g, g)
        rows.append((v / v.amax(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(n, k))
    return torch.cat(rows).mean(0)


def normalise(s: torch.Tensor) -> torch.Tensor:
    """Centre scales on 1 (geometric mean): keeps folded norms and weights in a sane range."""
    return s / s.log().mean().exp()


def clip_quantize(w: torch.Tensor, hessian: torch.Tensor | None, scheme: QuantScheme, n_grid: int = 20,
                  max_shrink: float = 0.5) -> QuantizedWeight:
    """Quantize `w` [N, K] with each (row, group) range shrunk by the ratio in {1, 1-1/n, ...} (down to
    1 - max_shrink) that minimises that group's output error d·H_gg·dᵀ, H = XᵀX of its inputs."""
    args = scheme.weights
    w = w.detach().float()
    n, k = w.shape
    g = int(args.group_size) if args.strategy == "group" else k
    wg = w.reshape(n, k // g, g)
    if hessian is None or max_shrink <= 0:
        scale, zp = minmax_qparams(wg, args)
    else:
        hb = torch.stack([hessian[i:i + g, i:i + g] for i in range(0, k, g)]).float()  # [G, g, g]
        lo0, hi0 = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        amax0 = wg.abs().amax(-1, keepdim=True)
        best_err = torch.full((n, k // g), math.inf)
        scale = torch.zeros(n, k // g, 1)
        zp = None if args.symmetric else torch.zeros(n, k // g, 1)
        for i in range(max(1, int(round(max_shrink * n_grid)) + 1)):
            r = 1.0 - i / n_grid
            if r < 1.0 - max_shrink - 1e-9:
                break
            clipped = wg.clamp(-amax0 * r, amax0 * r) if args.symmetric else wg.clamp(lo0 * r, hi0 * r)
            s, z = minmax_qparams(clipped, args)
            d = wg - fake_quantize(wg, s, z, args)
            err = torch.einsum("ngi,gij,ngj->ng", d, hb, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better[..., None], s, scale)
            if zp is not None and z is not None:
                zp = torch.where(better[..., None], z, zp)
    scale2 = scale.reshape(n, -1)
    zp2 = None if zp is None else zp.reshape(n, -1)
    return QuantizedWeight.from_values(quantize_weight(w, scale2, zp2, args), scale2, zp2, scheme)


def layer_prefix(t: Target) -> str:
    return t.name[: len(t.name) - len(t.local)]


def target_sets(calib: LayerCalibration, targets: list[Target]) -> tuple[dict[str, Target], set[str], str]:
    """This method's targets by local name, other methods' target local names, the layer prefix."""
    prefix = layer_prefix(targets[0])
    mine = {t.local: t for t in targets}
    others = {n[len(prefix):] for n in calib.stats if n.startswith(prefix)} - set(mine)
    return mine, others, prefix


@register_method
class AWQ(QuantMethod):
    """`method: awq`. Params: n_grid (scale exponents tried), duo_scaling (divide by weight salience),
    clip (range search after scaling), clip_grid / max_shrink, min_tokens (a routed expert with fewer
    routed calibration tokens is searched on all tokens), fold_value_output (kv_b value rows → o_proj; off
    by default: on the trained toy at W3 it raised held-out perplexity, 94.86 → 94.93, while SmoothQuant,
    which needs o_proj's input outliers smoothed, keeps it on)."""

    name = "awq"
    whole_layer: ClassVar[bool] = True  # a fold spans many targets: the pipeline passes the layer's all at once

    def __init__(self, n_grid: int = 20, duo_scaling: bool = True, clip: bool = True, clip_grid: int = 20,
                 max_shrink: float = 0.5, min_tokens: int = 16, fold_value_output: bool = False) -> None:
        super().__init__(n_grid=n_grid, duo_scaling=duo_scaling, clip=clip, clip_grid=clip_grid,
                         max_shrink=max_shrink, min_tokens=min_tokens, fold_value_output=fold_value_output)
        if int(n_grid) < 1 or int(clip_grid) < 1:
            raise SqueezeError("awq: n_grid and clip_grid must be >= 1")
        if not 0.0 <= float(max_shrink) < 1.0:
            raise SqueezeError(f"awq: max_shrink must be in [0, 1), got {max_shrink}")
        self.n_grid, self.duo, self.clip = int(n_grid), bool(duo_scaling), bool(clip)
        self.clip_grid, self.max_shrink, self.min_tokens = int(clip_grid), float(max_shrink), int(min_tokens)
        self.fold_vo = bool(fold_value_output)
        self.chosen: dict[str, float] = {}  # fold group (full name) -> chosen exponent (-1: identity)

    def candidates(self, x_mean: torch.Tensor, w_sal: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
        out: list[tuple[float, torch.Tensor]] = [(-1.0, torch.ones_like(x_mean))]
        x = x_mean.clamp_min(1e-6)
        w = w_sal.clamp_min(1e-6)
        for i in range(self.n_grid):
            a = i / self.n_grid
            s = x.pow(a) / w.pow(1 - a) if self.duo else x.pow(a)
            if a == 0.0 and not self.duo:
                continue  # the identity, already in
            out.append((a, normalise(s.clamp_min(1e-4))))
        return out

    def search(self, folds: LayerFolds, g: FoldGroup, mine: dict[str, Target]) -> tuple[float, torch.Tensor]:
        layer = folds.layer
        quantized = [n for n in g.linears if n in mine]
        args = mine[quantized[0]].scheme.weights  # type: ignore[attr-defined]
        x_mean, _ = folds.channel_stats(g)
        w_sal = weight_salience([layer.get_submodule(n).weight.data for n in quantized], args)
        inputs = folds.group_inputs(g)
        reference = folds.outputs(g, inputs)

        def fq(name: str, w: torch.Tensor) -> torch.Tensor:
            return rtn_dequantized(w, mine[name].scheme) if name in mine else w  # type: ignore[arg-type]

        best: tuple[float, float, torch.Tensor] | None = None
        for a, s in self.candidates(x_mean, w_sal):
            err = folds.error(g, inputs, reference, s, fq)
            if best is None or err < best[0]:
                best = (err, a, s)
        assert best is not None
        return best[1], best[2]

    def quantize_layer(self, layer: nn.Module, calib: LayerCalibration,
                       targets: list[Target]) -> dict[str, QuantizedWeight]:
        if not targets:
            return {}
        for t in targets:
            check_awq_scheme(t.scheme, t.name)  # type: ignore[arg-type]
        mine, others, prefix = target_sets(calib, targets)
        groups = usable_groups(layer, fold_groups(layer, self.fold_vo), set(mine), others)
        folds = LayerFolds(layer, calib, groups, self.min_tokens)
        for g in groups:
            a, s = self.search(folds, g, mine)
            self.chosen[prefix + g.key] = a
            folds.apply(g, s, prefix)
        out = {}
        for local, t in mine.items():
            h = None
            if self.clip:
                h = folds.mlp_hessian(local) if local.startswith("mlp.") else calib.stats[t.name].hessian
            out[t.name] = clip_quantize(t.module.weight.data, h, t.scheme,  # type: ignore[arg-type]
                                        self.clip_grid, self.max_shrink if self.clip else 0.0)
        return out
