"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's error onto the
columns not yet quantized through the inverse Hessian of the layer's calibration inputs.

H = XᵀX (from `LayerCalibration.collect_hessians`), dampened by `damp` × mean(diag H); columns that
never saw a non-zero input are zeroed. The inverse's upper Cholesky factor drives the updates; inside a
block of `block_size` columns updates are immediate, the rest of the matrix gets one lazy batched
update per block. `act_order` processes columns by decreasing diag(H); with groups the group
quantization parameters are then fixed up front from the original-order groups (compressed-tensors'
"weight" act-order), so the exported file needs no g_idx. Without act-order a group's parameters are
observed when the sweep reaches its first column, on the already-updated weights (the original
algorithm).
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.quant.calibration import LayerCalibration, Target
from squeeze.quant.linear import QuantizedWeight
from squeeze.quant.methods import QuantMethod, register_method
from squeeze.quant.observers import check_shape, fake_quantize, minmax_qparams, quantize_weight, weight_qparams
from squeeze.quant.rtn import rtn_quantize
from squeeze.quant.scheme import QuantScheme


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, raising λ if H is numerically singular."""
    k = h.shape[0]
    mean_diag = float(torch.diag(h).mean())
    for attempt in range(6):
        lam = damp * (10**attempt) * mean_diag
        try:
            lower = torch.linalg.cholesky(h + lam * torch.eye(k, dtype=h.dtype))
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise SqueezeError("GPTQ: the calibration Hessian is not positive definite even with strong dampening")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False) -> QuantizedWeight:
    """GPTQ on one [N, K] weight given H = XᵀX [K, K]; returns the stored integers and scales."""
    args = scheme.weights
    if args.strategy not in ("channel", "group"):
        return rtn_quantize(weight, scheme)  # block / tensor: GPTQ's column sweep does not apply
    check_shape(tuple(weight.shape), args)
    w = weight.detach().clone().float()
    n, k = w.shape
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    g = int(args.group_size) if args.strategy == "group" else k
    n_groups = k // g
    scale = torch.zeros(n, n_groups)
    zp = None if args.symmetric or args.type == "float" else torch.zeros(n, n_groups)
    static = act_order or args.strategy == "channel"
    if static:  # parameters fixed before the sweep
        s0, z0 = weight_qparams(w, args)
        scale.copy_(s0)
        if zp is not None and z0 is not None:
            zp.copy_(z0)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w = w[:, perm]
    h = h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp).float()
    group_of = perm // g  # original group of each swept column
    q_out = torch.zeros_like(w)

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = int(group_of[col])
            if not static and col % g == 0:  # first column of a group: observe the updated weights
                block = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :g]
                s, z = minmax_qparams(block, args)
                scale[:, gi] = s[:, 0]
                if zp is not None and z is not None:
                    zp[:, gi] = z[:, 0]
            s_col = scale[:, gi:gi + 1]
            z_col = None if zp is None else zp[:, gi:gi + 1]
            wq = fake_quantize(w1[:, i:i + 1], s_col, z_col, args)
            q_out[:, col] = wq[:, 0]
            e = (w1[:, i:i + 1] - wq) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i:i + 1, i:]
            err1[:, i] = e[:, 0]
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    w_hat = torch.empty_like(q_out)
    w_hat[:, perm] = q_out
    q = quantize_weight(w_hat, scale, zp, args)
    return QuantizedWeight.from_values(q, scale, zp, scheme)


@register_method
class GPTQ(QuantMethod):
    name = "gptq"
    needs_hessian = True

    def __init__(self, block_size: int = 128, damp: float = 0.01, act_order: bool = False) -> None:
        super().__init__(block_size=block_size, damp=damp, act_order=act_order)
        self.block_size, self.damp, self.act_order = int(block_size), float(damp), bool(act_order)

    def quantize_layer(self, layer: nn.Module, calib: LayerCalibration,
                       targets: list[Target]) -> dict[str, QuantizedWeight]:
        out = {}
        for t in targets:
            stats = calib.stats[t.name]
            out[t.name] = gptq_quantize(t.module.weight.data, stats.hessian, t.scheme,  # type: ignore[arg-type]
                                        self.block_size, self.damp, self.act_order)
        return out
