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

from typing import ClassVar

import torch
from torch import nn

from squeeze.checkpoint.fp8 import FP8_DTYPE
from squeeze.errors import SqueezeError
from squeeze.quant.calibration import LayerCalibration, Target
from squeeze.quant.linear import QuantizedWeight
from squeeze.quant.methods import QuantMethod, register_method
from squeeze.quant.observers import check_shape, dequantize, minmax_qparams, quantize, weight_qparams
from squeeze.quant.rtn import rtn_quantize
from squeeze.quant.scheme import QuantScheme


def _inverse_hessian_factor(h: torch.Tensor, damp: float, max_elements: int = 2**20) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU for H [K, K] or a batch [B, K, K], raising λ (per
    matrix) if H is numerically singular.

    One Cholesky and one triangular solve, no explicit inverse: with J the index reversal and
    JHJ = L'L'ᵀ, U = J L'⁻¹ J (upper, positive diagonal, and UᵀU = J L'⁻ᵀL'⁻¹ J = H⁻¹). The usual route
    (Cholesky, inverse, Cholesky again) costs twice the factorizations plus a matmul. fp32, as the
    reference GPTQ (float64 doubled the time and changed no output error in its 6th digit). Matrices
    are factored a few at a time (`max_elements`) so the temporaries stay small next to the weights.
    """
    single = h.dim() == 2
    hb = h.reshape(-1, h.shape[-2], h.shape[-1])
    b, k = hb.shape[0], hb.shape[-1]
    out = torch.empty(b, k, k)
    mean_diag = torch.diagonal(hb, dim1=-2, dim2=-1).float().mean(-1)
    per = max(1, max_elements // (k * k))
    for c0 in range(0, b, per):
        pending = torch.arange(c0, min(c0 + per, b))
        for attempt in range(6):
            flipped = hb[pending].flip(-2, -1).float()  # a copy
            torch.diagonal(flipped, dim1=-2, dim2=-1).add_((damp * 10**attempt * mean_diag[pending])[:, None])
            lower, info = torch.linalg.cholesky_ex(flipped)
            del flipped
            ok = info == 0
            if ok.any():
                eye = torch.eye(k).expand(int(ok.sum()), k, k)
                out[pending[ok]] = torch.linalg.solve_triangular(lower[ok], eye, upper=False).flip(-2, -1)
                pending = pending[~ok]
            if pending.numel() == 0:
                break
        else:
            raise SqueezeError("GPTQ: the calibration Hessian is not positive definite even with strong dampening")
    return out[0] if single else out


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False) -> QuantizedWeight:
    """GPTQ on one [N, K] weight given H = XᵀX [K, K]; returns the stored integers and scales."""
    return gptq_quantize_many([weight], [hessian], scheme, block_size, damp, act_order)[0]


# Working-set cap of one batched sweep, in weight elements (fp32): a few buffers of this size are live (16 MiB
# each). The column loop's cost is mostly per-op overhead, so fewer, larger sweeps are faster: 2**20 -> 2**22
# took a 16-expert layer's GPTQ from 1.44 to 0.87 s; 2**24 was slower again (cache misses).
BATCH_ELEMENTS = 2**22


def gptq_quantize_many(weights: list[torch.Tensor], hessians: list[torch.Tensor], scheme: QuantScheme,
                       block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                       max_elements: int = BATCH_ELEMENTS) -> list[QuantizedWeight]:
    """GPTQ on several weights of one scheme; the same as calling `gptq_quantize` on each (rows are
    independent given H), but faster: weights given the same Hessian tensor (the same object: e.g.
    every expert's gate / up when all experts observe all tokens) are stacked by rows under one inverse
    Hessian, and equal-shaped jobs with different Hessians are swept together as a batch, so the
    column loop runs once per batch instead of once per Linear. Batches hold at most `max_elements`."""
    args = scheme.weights
    if args.strategy not in ("channel", "group"):
        return [rtn_quantize(w, scheme) for w in weights]  # block / tensor: GPTQ's column sweep does not apply
    for w in weights:
        check_shape(tuple(w.shape), args)
    # jobs: rows of every weight sharing one Hessian, cut into pieces of at most max_elements
    by_h: dict[int, list[int]] = {}
    for i, h in enumerate(hessians):
        by_h.setdefault(id(h), []).append(i)
    pieces: list[tuple[int, list[tuple[int, int, int]]]] = []  # (hessian index, [(weight, row0, row1)])
    for members in by_h.values():
        k = weights[members[0]].shape[1]
        rows = [(i, r0, min(r0 + max(1, max_elements // k), weights[i].shape[0]))
                for i in members for r0 in range(0, weights[i].shape[0], max(1, max_elements // k))]
        total = sum(r1 - r0 for _, r0, r1 in rows)
        n_pieces = -(-total * k // max_elements)
        per = -(-total // n_pieces)
        cur: list[tuple[int, int, int]] = []
        size = 0
        for i, r0, r1 in rows:
            while r0 < r1:
                take = min(r1 - r0, per - size)
                cur.append((i, r0, r0 + take))
                size += take
                r0 += take
                if size == per:
                    pieces.append((members[0], cur))
                    cur, size = [], 0
        if cur:
            pieces.append((members[0], cur))
    # batches: pieces of equal [rows, K], up to max_elements together
    by_shape: dict[tuple[int, int], list[int]] = {}
    for p, (hi, rows) in enumerate(pieces):
        by_shape.setdefault((sum(r1 - r0 for _, r0, r1 in rows), hessians[hi].shape[0]), []).append(p)
    parts: dict[int, list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
    qdtype = FP8_DTYPE if args.type == "float" else torch.int8
    for (n, k), ps in by_shape.items():
        per_batch = max(1, max_elements // (n * k))
        for b0 in range(0, len(ps), per_batch):
            batch = [pieces[p] for p in ps[b0:b0 + per_batch]]
            # the sweep's working copy, built transposed ([B, K, N]) in one fp32 copy of the weights
            wt = torch.empty(len(batch), k, n)
            for j, (_, rows) in enumerate(batch):
                off = 0
                for i, r0, r1 in rows:
                    wt[j, :, off:off + r1 - r0] = weights[i][r0:r1].T
                    off += r1 - r0
            h = torch.stack([hessians[hi] for hi, _ in batch])
            q, scale, zp = _gptq_sweep(wt, h, args, block_size, damp, act_order, qdtype)
            del wt
            for j, (_, rows) in enumerate(batch):
                off = 0
                for i, r0, r1 in rows:
                    sl = slice(off, off + r1 - r0)
                    parts.setdefault(i, []).append((r0, r1, q[j, sl].clone(memory_format=torch.contiguous_format),
                                                    scale[j, sl].clone(),
                                                    None if zp is None else zp[j, sl].clone()))
                    off += r1 - r0
    out = []
    for i in range(len(weights)):
        ps = sorted(parts[i], key=lambda x: x[0])
        q = torch.cat([x[2] for x in ps])
        scale = torch.cat([x[3] for x in ps])
        zp = None if ps[0][4] is None else torch.cat([x[4] for x in ps])  # type: ignore[misc]
        out.append(QuantizedWeight.from_values(q, scale, zp, scheme))
    return out


def _gptq_sweep(w: torch.Tensor, hessian: torch.Tensor, args, block_size: int, damp: float, act_order: bool,
                qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The GPTQ column sweep on a batch of transposed weights w [B, K, N] (fp32, updated in place: the
    caller's working copy) with hessian [B, K, K]; returns the stored values [B, N, K] in `qdtype` and the
    scales and zero points [B, N, groups].

    Transposed, a column and the block of columns each step updates are contiguous rows: with [B, N, K]
    every column op gathers one element per cache line (8192-row batches: 1.4x slower overall). The stored
    integers are taken in the loop, so no full-size float buffer of results is ever built.
    """
    bsz, k, n = w.shape
    h = hessian.to(torch.float32, copy=True)
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    w.masked_fill_(dead[:, :, None], 0.0)

    g = int(args.group_size) if args.strategy == "group" else k
    n_groups = k // g
    scale = torch.zeros(bsz, n, n_groups)
    zp = None if args.symmetric or args.type == "float" else torch.zeros(bsz, n, n_groups)
    static = act_order or args.strategy == "channel"
    if static:  # parameters fixed before the sweep
        s0, z0 = weight_qparams(w.transpose(1, 2).reshape(bsz * n, k), args)
        scale.copy_(s0.reshape(bsz, n, n_groups))
        if zp is not None and z0 is not None:
            zp.copy_(z0.reshape(bsz, n, n_groups))

    if act_order:
        perm = torch.argsort(torch.diagonal(h, dim1=-2, dim2=-1), dim=-1, descending=True)  # [B, K]
        w = w.gather(1, perm[:, :, None].expand(bsz, k, n))
        bi = torch.arange(bsz)[:, None, None]
        h = h[bi, perm[:, :, None], perm[:, None, :]]
    else:
        perm = None
    hinv = _inverse_hessian_factor(h, damp)
    del h
    # original group of each swept column: [B, K] with act-order, else the same for every batch member
    group_of = perm // g if perm is not None else None
    q_out = torch.empty(bsz, k, n, dtype=qdtype)

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()  # [B, bs, N]
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[:, i1:i2, i1:i2]
        if static:  # this block's per-column parameters, gathered once, as rows [B, bs, N]
            if group_of is None:
                cols = torch.arange(i1, i2) // g
                s_blk = scale[:, :, cols]
                z_blk = None if zp is None else zp[:, :, cols]
            else:
                idx = group_of[:, None, i1:i2].expand(bsz, n, i2 - i1)
                s_blk = scale.gather(2, idx)
                z_blk = None if zp is None else zp.gather(2, idx)
            s_blk = s_blk.transpose(1, 2).contiguous()
            z_blk = None if z_blk is None else z_blk.transpose(1, 2).contiguous()
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                s_col = s_blk[:, i:i + 1]
                z_col = None if z_blk is None else z_blk[:, i:i + 1]
            else:
                gi = col // g
                if col % g == 0:  # first column of a group: observe the updated weights
                    block = w1[:, i:i + g]
                    if block.shape[1] < g:
                        block = torch.cat([block, w[:, i2:i2 + g - block.shape[1]]], dim=1)
                    s, z = minmax_qparams(block.transpose(1, 2), args)  # [B, N, 1]
                    scale[:, :, gi] = s[:, :, 0]
                    if zp is not None and z is not None:
                        zp[:, :, gi] = z[:, :, 0]
                s_col = scale[:, None, :, gi]
                z_col = None if zp is None else zp[:, None, :, gi]
            wcol = w1[:, i:i + 1]  # [B, 1, N]
            q = quantize(wcol, s_col, z_col, args)
            q_out[:, col] = q[:, 0]  # integers (or fp8 values): exact in the stored dtype
            e = (wcol - dequantize(q, s_col, z_col)) / hinv1[:, i, i, None, None]
            w1[:, i:].addcmul_(hinv1[:, i, i:, None], e, value=-1.0)
            err1[:, i] = e[:, 0]
        if i2 < k:
            w[:, i2:].baddbmm_(hinv[:, i1:i2, i2:].transpose(1, 2), err1, alpha=-1.0)

    if perm is not None:
        q_out = torch.empty_like(q_out).scatter_(1, perm[:, :, None].expand(bsz, k, n), q_out)
    return q_out.transpose(1, 2), scale, zp


@register_method
class GPTQ(QuantMethod):
    name = "gptq"
    needs_hessian = True
    # all of a layer's targets in one call, so that targets sharing a Hessian (every expert's gate / up)
    # or a shape (every expert's down) are swept together (`gptq_quantize_many`)
    whole_layer: ClassVar[bool] = True

    def __init__(self, block_size: int = 128, damp: float = 0.01, act_order: bool = False) -> None:
        super().__init__(block_size=block_size, damp=damp, act_order=act_order)
        self.block_size, self.damp, self.act_order = int(block_size), float(damp), bool(act_order)

    def quantize_layer(self, layer: nn.Module, calib: LayerCalibration,
                       targets: list[Target]) -> dict[str, QuantizedWeight]:
        out: dict[str, QuantizedWeight] = {}
        by_scheme: dict[str, list[Target]] = {}
        for t in targets:
            by_scheme.setdefault(repr(t.scheme), []).append(t)
        for group in by_scheme.values():
            qws = gptq_quantize_many([t.module.weight.data for t in group],
                                     [calib.stats[t.name].hessian for t in group], group[0].scheme,  # type: ignore[arg-type]
                                     self.block_size, self.damp, self.act_order)
            out.update((t.name, qw) for t, qw in zip(group, qws, strict=True))
        return out
