"""W8A8-INT8 GEMM: dynamic per-token activation scales, per-channel weight scales.

x is quantized per row (symmetric, scale = amax / 127, round half away from zero) by
:func:`quant_int8_act`; the GEMM accumulates int8 x int8 products exactly in int32 on the tensor
cores and applies ``x_scale[m] * w_scale[n]`` once in the epilogue. Tiling and split-K as in
:mod:`.w4a16` (swap-AB, acc[BLOCK_N, BLOCK_M]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _graphs, _splitk, _tuning
from ._dispatch import Backend, check_w8a8_args, num_sms, use_triton
from ._tl import cast_out, gemm_tile
from .reference import linear_w8a8_ref


@triton.jit
def _int8_act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    """One row per program: pass 1 finds amax, pass 2 (row now in L1/L2) quantizes."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), 127.0)  # IEEE, as torch
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.math.div_rn(x, s)
        y = tl.where(y >= 0, y + 0.5, y - 0.5)  # round half away from zero, then truncate
        q = tl.minimum(tl.maximum(y, -127.0), 127.0).to(tl.int32).to(tl.int8)
        tl.store(q_ptr + row * stride_qm + k0 + offs, q, mask=mask)
    tl.store(s_ptr + row, s)


def quant_int8_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M, K], fp32 per-token scales [M])."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    block = min(2048, triton.next_power_of_2(k))
    _int8_act_quant_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK_K=block, num_warps=4)
    return q, s


@triton.jit
def _w8a8_gemm_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr,
    M, N, K, SPLIT_K,
    stride_xm, stride_wn, stride_om, stride_osplit,
    EVEN_K: tl.constexpr, GROUP_M: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k, pid_n, offs_m, offs_n, rm, rn, kb_start, kb_end = gemm_tile(
        M, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
    )
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = xq_ptr + rm[None, :] * stride_xm + offs_k[:, None]  # [BLOCK_K, BLOCK_M]
    w_ptrs = w_ptr + rn[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        if EVEN_K:
            xt = tl.load(x_ptrs + k0)
            w = tl.load(w_ptrs + k0)
        else:
            kmask = (k0 + offs_k) < K
            xt = tl.load(x_ptrs + k0, mask=kmask[:, None], other=0)
            w = tl.load(w_ptrs + k0, mask=kmask[None, :], other=0)
        acc = tl.dot(w, xt, acc, out_dtype=tl.int32)

    a_s = tl.load(xs_ptr + rm)
    w_s = tl.load(ws_ptr + rn).to(tl.float32)
    y = acc.to(tl.float32) * w_s[:, None] * a_s[None, :]
    out_ptrs = out_ptr + pid_k * stride_osplit + offs_m[None, :] * stride_om + offs_n[:, None]
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    tl.store(out_ptrs, cast_out(y, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@dataclass(frozen=True)
class W8A8Config:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 0  # 0: choose from the grid size


def _candidates(m: int, interpret: bool) -> list[W8A8Config]:
    if interpret:
        return [W8A8Config(16, 32, 32, 4, 1)]
    if m <= 16:
        return [W8A8Config(16, bn, 128, 4, st) for bn in (32, 64, 128) for st in (3, 4)]
    if m <= 64:
        return [W8A8Config(bm, bn, 128, 4, 3, sk) for bm in (32, 64) for bn in (64, 128) for sk in (0, 1)]
    if m <= 256:
        return [W8A8Config(bm, 128, 128, w, 4, sk) for bm in (64, 128) for w in (4, 8) for sk in (0, 1)]
    return [W8A8Config(128, 128, 128, 8, 4), W8A8Config(128, 256, 128, 8, 3), W8A8Config(256, 128, 128, 8, 3)]


def launch_w8a8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    cfg: W8A8Config,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """GEMM on already-quantized activations (exposed so tests can force every code path)."""
    m, k = xq.shape
    n = w.shape[0]
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split = cfg.split_k or _splitk.auto_split(tiles, triton.cdiv(k, cfg.block_k), num_sms(xq.device))
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    target, split_stride = _splitk.target(out, split)
    _w8a8_gemm_kernel[(tiles, split)](
        xq, xs, w, w_scale.reshape(-1), target,
        m, n, k, split,
        xq.stride(0), w.stride(0), target.stride(-2), split_stride,
        EVEN_K=k % cfg.block_k == 0, GROUP_M=8, INTERPRET=not xq.is_cuda,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _splitk.finish(out, target, split)


def linear_w8a8(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, backend: Backend = "auto"
) -> torch.Tensor:
    """y = (q_x @ W.T) * x_scale * w_scale; x [..., K] float, W int8 [N, K], weight_scale [N] or [N, 1]."""
    check_w8a8_args(x, weight, weight_scale)
    n = weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if not use_triton(backend, x, weight):
        return linear_w8a8_ref(x2, weight, weight_scale).reshape(*x.shape[:-1], n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    bucket = 1 << max(0, (m - 1).bit_length())
    key = ("w8a8", x.dtype, bucket, n, k)
    # the activation quantization is part of every call (and of every timed candidate: the same for each)
    call = lambda x2, c, w=weight, ws=weight_scale: launch_w8a8(*quant_int8_act(x2), w, ws, c, x.dtype)  # noqa: E731
    run = lambda c: call(x2, c)  # noqa: E731
    cold = lambda: [  # noqa: E731
        lambda c, o=o: call(x2, c, o[0], o[1]) for o in _tuning.cold_copies(weight, weight_scale)
    ]
    cfg = _tuning.pick(key, lambda: _candidates(m, not x.is_cuda), run, x.is_cuda, cold=cold)
    if _graphs.applicable(x2):  # decode: host-bound eagerly (see _graphs)
        y = _graphs.run((key, cfg), lambda x2: call(x2, cfg), (x2,), (weight, weight_scale))
    else:
        y = call(x2, cfg)
    return y.reshape(*x.shape[:-1], n)

