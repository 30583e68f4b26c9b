"""W4A16 / W8A16 dequant-GEMM: y[M, N] = x[M, K] @ dequant(W)[N, K].T with grouped scales.

Design:
* Swap-AB: each program computes acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile.T, so the dequantized
  weight is the MMA's A operand, produced in registers, and a decode batch of M = 1..16 is the
  narrow N side of the MMA instead of wasting a 64-row M tile.
* Dequant costs two integer ops per weight: ``(word >> 4i) & 0xF | MAGIC`` reinterpreted as
  bf16 is exactly ``128 + u`` (fp16: ``1024 + u``), with no int->float conversion. The offset and
  the zero point are removed after the dot, per group, using the per-column sum of x:
  ``sum_k x_k (q_k - zp) s = s * (dot(x, MAGIC + u) - (MAGIC + 8 + zp) * sum_k x_k)``.
  The group scale is applied to the [BLOCK_N, BLOCK_M] partial result, not to every weight, which
  is why a K-block never straddles a group (BLOCK_K divides the group size).
* Split-K for small M x small N so that every SM streams weights; partials go to an fp32
  workspace that one small kernel sums (_splitk.py). For large M, the tuner may instead pick
  "dequantize the whole weight once to bf16, then cuBLAS" (:func:`dequantize_to`), or the same in
  N chunks with each chunk's dequant on a side stream overlapping cuBLAS on the previous chunk
  (``_overlap.py``), whichever is faster on the device.

Small M (2..256): :func:`_w4_planes_kernel` instead. :func:`_wq_gemm_kernel` converts each dequantized bf16 tile
into the MMA register layout through shared memory (its int32 -> int16 narrowing stops Triton's
dot-operand hoisting), which held it at 64-67 us on (18432, 7168) at M = 16 whatever the unpack or
pipelining (ncu: 35% of DRAM bandwidth). The plane kernel reads the words as int16 and dequantizes each
nibble plane with one elementwise op, so the words go global -> shared (cp.async or TMA) -> wgmma A
registers, dequantized in place: 36 us there (2.8x cuBLAS bf16, H100; BENCH_H100.md), no offline repack.

Measured on an H100 (BENCH_H100.md): decode of (18432, 7168) at M = 1 runs at 31-33 us through the
nibble-phase CUDA-core GEMV fed by TMA (gemv.py; 2.0-2.1 TB/s of int4 weights, 1.4x the 23 us floor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import _graphs, _overlap, _splitk, _tuning
from ._dispatch import (
    Backend,
    check_wq_args,
    group_blocks,
    num_sms,
    tile_descriptor,
    tma_compatible,
    use_triton,
)
from ._tl import cast_out, gemm_tile, int4_dot_permuted, int4_plane16, int4_words_to_magic, mma
from .gemv import w4_gemv_tma_kernel, x_phase_kernel
from .reference import linear_wq_ref, resolve_group

# Bits of 128.0 (bf16) / 1024.0 (fp16), where one ulp is 1, and their values (see _tl.py).
MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


@triton.jit
def _wq_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, GROUP_BLOCKS, SPLIT_K,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_om, stride_osplit,
    WBITS: tl.constexpr, HAS_ZP: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_VAL: tl.constexpr,
    EVEN_K: tl.constexpr, GROUP_M: tl.constexpr, INTERPRET: tl.constexpr,
    UNPACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr = False,
):
    pid_k, pid_n, offs_m, offs_n, rm, rn, kb_start, kb_end = gemm_tile(
        M, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
    )
    offs_k = tl.arange(0, BLOCK_K)
    offs_kw = tl.arange(0, BLOCK_K // 8)

    x_rows = x_ptr + rm[None, :] * stride_xm
    x_ptrs = x_rows + offs_k[:, None]  # x tile, transposed: [BLOCK_K, BLOCK_M]
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if PREFETCH:
        k_first = tl.minimum(kb_start, tl.cdiv(K, BLOCK_K) - 1) * BLOCK_K
        w_first = w_ptr + rn[:, None] * stride_wn + (k_first // 8 + offs_kw)[None, :]
        p_pre = tl.load(w_first, mask=(k_first // 8 + offs_kw)[None, :] < K // 8, other=0)
        s_pre = tl.load(s_ptr + rn * stride_sn + k_first // BLOCK_K // GROUP_BLOCKS)
        if HAS_ZP:
            z_pre = tl.load(z_ptr + rn * stride_zn + k_first // BLOCK_K // GROUP_BLOCKS)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        if EVEN_K:
            xt = tl.load(x_ptrs + k0)
        else:
            xt = tl.load(x_ptrs + k0, mask=(k0 + offs_k)[:, None] < K, other=0.0)
        if WBITS == 4:
            if PREFETCH:
                # Register double-buffering: issue the next block's words before this block's MMA
                # (Triton's pipeliner skips loads that reach tl.dot through the unpack arithmetic).
                p = p_pre
                kn = tl.where(kb + 1 < kb_end, k0 + BLOCK_K, k0)
                nw = w_ptr + rn[:, None] * stride_wn + (kn // 8 + offs_kw)[None, :]
                if EVEN_K:
                    p_pre = tl.load(nw)
                else:
                    p_pre = tl.load(nw, mask=(kn // 8 + offs_kw)[None, :] < K // 8, other=0)
            else:
                w_ptrs = w_ptr + rn[:, None] * stride_wn + (k0 // 8 + offs_kw)[None, :]
                if EVEN_K:
                    p = tl.load(w_ptrs)
                else:
                    p = tl.load(w_ptrs, mask=(k0 // 8 + offs_kw)[None, :] < K // 8, other=0)
            if UNPACK == 2:
                d = int4_dot_permuted(p, x_rows, k0, K, MAGIC_BITS, dtype, EVEN_K, INTERPRET, BLOCK_K)
            else:
                d = mma(int4_words_to_magic(p, BLOCK_N, BLOCK_K, MAGIC_BITS, dtype, UNPACK), xt, INTERPRET)
            offset = MAGIC_VAL + 8.0
        else:
            w_ptrs = w_ptr + rn[:, None] * stride_wn + (k0 + offs_k)[None, :]
            if EVEN_K:
                w = tl.load(w_ptrs).to(tl.float32).to(dtype)
            else:
                w = tl.load(w_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0).to(tl.float32).to(dtype)
            offset = 0.0
            d = mma(w, xt, INTERPRET)
        g = kb // GROUP_BLOCKS
        if PREFETCH and WBITS == 4:  # the scales too: a bf16 load is too narrow for the pipeliner's cp.async
            s = s_pre.to(tl.float32)
            s_pre = tl.load(s_ptr + rn * stride_sn + kn // BLOCK_K // GROUP_BLOCKS)
        else:
            s = tl.load(s_ptr + rn * stride_sn + g).to(tl.float32)
        if HAS_ZP:
            if PREFETCH and WBITS == 4:
                zoff = offset + z_pre.to(tl.float32)
                z_pre = tl.load(z_ptr + rn * stride_zn + kn // BLOCK_K // GROUP_BLOCKS)
            else:
                zoff = offset + tl.load(z_ptr + rn * stride_zn + g).to(tl.float32)
            xsum = tl.sum(xt.to(tl.float32), axis=0)
            acc += s[:, None] * (d - zoff[:, None] * xsum[None, :])
        elif WBITS == 4:
            xsum = tl.sum(xt.to(tl.float32), axis=0)
            acc += s[:, None] * (d - offset * xsum[None, :])
        else:
            acc += s[:, None] * d

    out_ptrs = out_ptr + pid_k * stride_osplit + offs_m[None, :] * stride_om + offs_n[:, None]
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    tl.store(out_ptrs, cast_out(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def x_planes_tile(x_ptr, xp_ptr, xs_ptr, m, kb, K, stride_xm, stride_xpm, stride_xsm, BLOCK_K: tl.constexpr):
    """Row m, K block kb of x in nibble-plane order for :func:`_w4_planes_kernel`, and the block's sum (for
    zero points).

    Within K block kb, x[kb * BLOCK_K + 4 w + i] goes to kb * BLOCK_K + i * BLOCK_K / 4 + w, so the
    slice that multiplies nibble plane i of the 16-bit words is contiguous (the GEMM's x tiles then
    stream through cp.async like its weights); zero past K.
    """
    j = tl.arange(0, BLOCK_K)
    W: tl.constexpr = BLOCK_K // 4
    src = kb * BLOCK_K + 4 * (j % W) + j // W
    v = tl.load(x_ptr + m * stride_xm + src, mask=src < K, other=0.0)
    tl.store(xp_ptr + m * stride_xpm + kb * BLOCK_K + j, v)
    tl.store(xs_ptr + m * stride_xsm + kb, tl.sum(v.to(tl.float32), axis=0))


@triton.jit
def x_planes_kernel(x_ptr, xp_ptr, xs_ptr, K, stride_xm, stride_xpm, stride_xsm, BLOCK_K: tl.constexpr,
                    PDL: tl.constexpr):
    """:func:`x_planes_tile` for every (row, K block), one program each."""
    if PDL:
        gdc_launch_dependents()  # the GEMM may launch now; it waits for these stores on the device
    x_planes_tile(x_ptr, xp_ptr, xs_ptr, tl.program_id(0), tl.program_id(1), K, stride_xm, stride_xpm, stride_xsm,
                  BLOCK_K)


@triton.jit
def _w4_planes_kernel(
    xp_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, GROUP_BLOCKS, SPLIT_K,
    stride_xpm, stride_xsm, stride_wn, stride_sn, stride_zn, stride_om, stride_osplit,
    HAS_ZP: tl.constexpr, EVEN_K: tl.constexpr, GROUP_M: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
    TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """int4 GEMM for small M on the int16 view of the words (4 nibbles each), swap-AB.

    Each K block is 4 MMAs of depth BLOCK_K / 4, one per nibble plane (k = 4 w + i), against x
    already in plane order (:func:`x_planes_kernel`). Because the dequant (:func:`._tl.int4_plane16`)
    is one elementwise op on the loaded words, Triton pipelines the words global -> shared with
    cp.async and loads them from shared straight into the wgmma A-operand registers, where they are
    dequantized: no dequantized tile ever goes through shared memory (it does in
    :func:`_wq_gemm_kernel`, whose int32 -> int16 narrowing stops that optimization).
    PDL: launched as a programmatic dependent of the x pass; ``gdc_wait`` holds every read until it is done.
    """
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid_k, pid_n, offs_m, offs_n, rm, rn, kb_start, kb_end = gemm_tile(
        M, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
    )
    W: tl.constexpr = BLOCK_K // 4
    offs_w = tl.arange(0, W)
    if not TMA:
        w_rows = w_ptr + rn[:, None] * stride_wn
    x_cols = xp_ptr + rm[None, :] * stride_xpm
    dtype = xp_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        if TMA:  # w_ptr is a descriptor of [BLOCK_N, BLOCK_K / 4] boxes (zeros past N and K)
            p = w_ptr.load([pid_n * BLOCK_N, k0 // 4])
        elif EVEN_K:
            p = tl.load(w_rows + (k0 // 4 + offs_w)[None, :])
        else:
            kw = k0 // 4 + offs_w
            p = tl.load(w_rows + kw[None, :], mask=kw[None, :] < K // 4, other=0)
        d = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for i in tl.static_range(4):
            xi = tl.load(x_cols + (k0 + i * W + offs_w)[:, None])
            d = mma(int4_plane16(p, i, dtype, INTERPRET), xi, INTERPRET, d)
        g = kb // GROUP_BLOCKS
        s = tl.load(s_ptr + rn * stride_sn + g).to(tl.float32)
        if HAS_ZP:
            z = tl.load(z_ptr + rn * stride_zn + g).to(tl.float32)
            xs = tl.load(xs_ptr + rm * stride_xsm + kb)
            acc += s[:, None] * (d - z[:, None] * xs[None, :])
        else:
            acc += s[:, None] * d

    out_ptrs = out_ptr + pid_k * stride_osplit + offs_m[None, :] * stride_om + offs_n[:, None]
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    tl.store(out_ptrs, cast_out(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, group_size, stride_wn, stride_sn, stride_zn, stride_on,
    WBITS: tl.constexpr, HAS_ZP: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_VAL: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FMA: tl.constexpr = False,
):
    """W (packed int4 or int8) -> dense [N, K] (bf16/fp16), used before cuBLAS for large M.

    Same unpacking as the GEMM (each packed word read once, 16-byte loads); BLOCK_K divides the
    group size, so one scale (and zero point) per row per program. FMA (16-bit outputs): one
    ``fma(t, s, -offset * s)`` per value instead of a subtract and a multiply; exact for 16-bit scales
    (every product fits fp32's mantissa), so the output is unchanged.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    rn = tl.minimum(offs_n, N - 1)
    dtype = out_ptr.dtype.element_ty
    g = k0 // group_size
    s = tl.load(s_ptr + rn * stride_sn + g).to(tl.float32)
    if WBITS == 4:
        kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        p = tl.load(w_ptr + rn[:, None] * stride_wn + kw[None, :], mask=kw[None, :] < K // 8, other=0)
        t = int4_words_to_magic(p, BLOCK_N, BLOCK_K, MAGIC_BITS, tl.bfloat16, 1).to(tl.float32)
        off = tl.full((BLOCK_N,), MAGIC_VAL + 8.0, tl.float32)
    else:
        t = tl.load(w_ptr + rn[:, None] * stride_wn + offs_k[None, :], mask=offs_k[None, :] < K, other=0)
        t = t.to(tl.float32)
        off = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_ZP:
        off = off + tl.load(z_ptr + rn * stride_zn + g).to(tl.float32)
    if FMA:
        w = tl.fma(t, s[:, None], (-(off * s))[:, None])
    else:
        w = (t - off[:, None]) * s[:, None]
    out = cast_out(w, dtype, INTERPRET)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], out, mask)


@dataclass(frozen=True)
class WqConfig:
    """One launch strategy. ``dequant_cublas`` ignores the tile fields."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 0  # 0: choose from the grid size
    dequant_cublas: bool = False
    # int4 unpacking: 0 reshape, 1 join tree, 2 K-permuted MMAs (see _tl.py); 3 the plane kernel
    # (_w4_planes_kernel: 16-bit words, x in plane order)
    unpack: int = 0
    # M = 1 only: CUDA-core nibble-phase GEMV fed by TMA (gemv.py), block_n rows per program, num_stages deep ring
    gemv: bool = False
    ng: int = 8  # with gemv: sub-blocks (<= 128 values, inside one scale group) per step
    prefetch: bool = False  # MMA kernel: load the next K block's int4 words while this one computes
    tma: bool = False  # with unpack 3: the words arrive by TMA (where a descriptor can view them)
    # chunks > 0: dequantize N in that many chunks on a side stream, overlapped with cuBLAS on the
    # previous chunk (_overlap.py; the other fields below only apply then)
    chunks: int = 0
    first_div: int = 1  # the first (exposed) chunk is 1 / first_div the size of the others
    carveout: int = 0  # SMs cuBLAS leaves free for the dequant (torch's experimental SM carve-out)
    lt: bool = False  # route those GEMMs through cuBLASLt (which honours the carve-out)
    prio: int = 0  # 0 default priorities, 1 dequant stream high priority, 2 GEMM stream high priority
    contig_out: bool = False  # GEMM into a contiguous temporary + copy, instead of out[:, n0:n1]
    dq_block_n: int = 64  # dequant kernel rows per program (chunked path)
    dq_warps: int = 4  # dequant kernel warps per program (chunked path)


def _candidates(m: int, interpret: bool) -> list[WqConfig]:
    if interpret:
        return [WqConfig(16, 32, 32, 4, 1)]
    if m <= 16:
        # H100, 2026-11-28 sweeps: the plane kernel beat every _wq_gemm_kernel config at M = 16 on the four
        # DeepSeek shapes (46.6 vs 65.6 us on 18432 x 7168; 37.6 with its words through TMA, the rest within
        # noise either way); two of the old configs stay for groups that are not multiples of 64.
        mma = [WqConfig(16, bn, 128, 4, 3, sk, unpack=3, tma=t)
               for bn, sk, t in ((64, 2, True), (128, 2, True), (64, 2, False), (128, 2, False), (128, 0, False))]
        mma += [WqConfig(16, bn, 128, 4, 3, unpack=1, prefetch=True) for bn in (64, 128)]
        # GEMV (block_n, warps, ng, stages): in the H100 sweep after the nibble and scale-prefetch changes,
        # (32, 2, 4, 3) won on 18432 x 7168 and 24576 x 1536, (8, 2, 8, 3) on the two small shapes; the
        # others were within 3% somewhere.
        gemv = [WqConfig(1, bn, 128, w, st, gemv=True, ng=ng)
                for bn, w, ng, st in ((32, 2, 4, 3), (8, 2, 8, 3), (16, 2, 8, 3), (16, 2, 4, 4), (16, 4, 8, 3))]
        return gemv + mma if m == 1 else mma
    # M = 17..256, same sweep: the plane kernel won every shape at M = 32, 64 and 128 (M = 64 on 18432 x 7168:
    # 71.9 vs 143.4 us; M = 128: 114.9 vs 260.3); one _wq_gemm_kernel config each stays for groups that are not
    # multiples of 64.
    # 2026-11-28 second sweep (after the group index lost its division), M = 64 / 128 on 18432 x 7168: 64 rows by TMA
    # with split 3 (66.3 vs 71.2 us) / 8 warps split 2 (112.8 vs 117.8); M = 128 on 24576 x 1536 split 1
    # (34.6 vs 43.0), on 2048 x 7168 64 x 64 tiles (27.8 vs 31.5).
    if m <= 64:
        return [WqConfig(bm, 128, 128, w, 3, sk, unpack=3, tma=t)
                for bm, w, sk, t in ((32, 4, 2, True), (32, 4, 2, False), (32, 4, 0, False), (64, 4, 0, False),
                                     (64, 8, 2, False), (64, 4, 3, True), (64, 4, 1, True))] + [
            WqConfig(32, 64, 128, 4, 3)]
    if m <= 256:
        return [WqConfig(64, bn, 128, w, 3, sk, unpack=3, tma=t)
                for bn, w, sk, t in ((128, 4, 0, False), (128, 4, 2, False), (128, 8, 0, False), (128, 8, 2, False),
                                     (128, 8, 2, True), (128, 4, 1, False), (64, 4, 2, False))] + [
            WqConfig(64, 128, 64, 4, 3)]
    return [
        WqConfig(128, 128, 64, 8, 4),
        WqConfig(128, 256, 64, 8, 3),
        WqConfig(256, 128, 64, 8, 3),
        WqConfig(dequant_cublas=True),
        *OVERLAP,
    ]


# Overlapped "chunked dequant + cuBLAS" configs (_overlap.py) the tuner tries at M > 256: each won
# (or, c8/co16/p2, came within noise of winning) on a DeepSeek shape in the H100 run recorded in
# BENCH_H100.md (bench.py --section w4large, run 2), where the tuner also had five more that lost everywhere.
OVERLAP: list[WqConfig] = [
    WqConfig(dequant_cublas=True, chunks=c, first_div=1, carveout=co, prio=p, dq_block_n=bn)
    for c, co, p, bn in ((8, 24, 2, 32), (8, 16, 2, 64), (3, 16, 0, 64), (3, 16, 0, 32), (2, 0, 0, 64))
]


def dequantize_to(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """Dense [N, K] weight in ``dtype`` (bf16/fp16/fp32) from packed int4 / int8 (one Triton pass).

    ``out``: an [N, K] tensor with unit column stride to write into (``dtype`` is then its dtype).
    """
    n = weight.shape[0]
    k = weight.shape[1] * (8 if weight.dtype == torch.int32 else 1)
    g = resolve_group(group_size, k)
    block_k = math.gcd(128, g) if group_size != -1 else 128
    if out is None:
        out = torch.empty(n, k, dtype=dtype, device=weight.device)
    elif out.shape != (n, k) or out.stride(1) != 1:
        raise ValueError(f"out must be [{n}, {k}] with unit column stride, got {tuple(out.shape)}")
    zp = zero_point if zero_point is not None else scale
    magic_bits, magic_val = MAGIC[torch.bfloat16]  # exact either way; values leave as fp32
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        weight, scale, zp, out, n, k, g, weight.stride(0), scale.stride(0), zp.stride(0), out.stride(0),
        WBITS=4 if weight.dtype == torch.int32 else 8, HAS_ZP=zero_point is not None,
        MAGIC_BITS=magic_bits, MAGIC_VAL=magic_val, INTERPRET=not weight.is_cuda, BLOCK_N=block_n, BLOCK_K=block_k,
        FMA=out.dtype != torch.float32, num_warps=num_warps,
    )
    return out


def launch_wq(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int,
    cfg: WqConfig,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one strategy on a 2-D x (exposed so tests can force every code path)."""
    m, k = x.shape
    n = weight.shape[0]
    g = resolve_group(group_size, k)
    if cfg.chunks:
        deq = lambda w, s, z, buf: dequantize_to(  # noqa: E731
            w, s, z, group_size, buf.dtype, out=buf, block_n=cfg.dq_block_n, num_warps=cfg.dq_warps)
        return _overlap.linear_chunked(
            x, weight, scale, zero_point, deq, out, chunks=cfg.chunks, first_div=cfg.first_div,
            carveout=cfg.carveout, lt=cfg.lt, prio=cfg.prio, contig_out=cfg.contig_out,
        )
    if cfg.dequant_cublas:
        y = F.linear(x, dequantize_to(weight, scale, zero_point, group_size, x.dtype))
        return y if out is None else out.copy_(y)
    wbits = 4 if weight.dtype == torch.int32 else 8
    if cfg.gemv and (m != 1 or wbits != 4 or not _gemv_tma_ok(weight, group_size)):
        cfg = WqConfig(unpack=1)  # the GEMV handles one int4 row only, in a layout TMA can describe
    if cfg.gemv:
        if out is None:
            out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        return _launch_phase_gemv(x, weight, scale, zero_point, group_size, g, cfg, out)
    block_k = math.gcd(cfg.block_k, g) if group_size != -1 else cfg.block_k  # never straddles a group
    block_m = cfg.block_m
    unpack = int4_unpack(cfg.unpack, block_k, x.is_cuda) if wbits == 4 else 0
    if unpack == 3:
        if out is None:
            out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        return _launch_planes(x, weight, scale, zero_point, g, block_k, cfg, out)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, cfg.block_n)
    k_blocks = triton.cdiv(k, block_k)
    split = cfg.split_k or _splitk.auto_split(tiles, k_blocks, num_sms(x.device))
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    target, split_stride = _splitk.target(out, split)
    magic_bits, magic_val = MAGIC[x.dtype]
    zp = zero_point if zero_point is not None else scale
    _wq_gemm_kernel[(tiles, split)](
        x, weight, scale, zp, target,
        m, n, k, group_blocks(g, block_k, k), split,
        x.stride(0), weight.stride(0), scale.stride(0), zp.stride(0), target.stride(-2), split_stride,
        WBITS=wbits, HAS_ZP=zero_point is not None, MAGIC_BITS=magic_bits, MAGIC_VAL=magic_val,
        EVEN_K=k % block_k == 0, GROUP_M=8, INTERPRET=not x.is_cuda, UNPACK=unpack,
        PREFETCH=cfg.prefetch and wbits == 4, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _splitk.finish(out, target, split)


def int4_unpack(unpack: int, block_k: int, on_cuda: bool) -> int:
    """The int4 unpack mode that runs: modes 2 and 3 split a K block into 8 / 4 MMAs, each of which needs
    depth >= 16 on the GPU, so smaller blocks (groups that are not multiples of 128 / 64) fall back to mode 1."""
    if on_cuda and (unpack == 2 and block_k < 128 or unpack == 3 and block_k < 64):
        return 1
    return unpack


def x_planes_buffers(x: torch.Tensor, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (x in plane order, zero-padded to whole block_k-wide K blocks; fp32 sums per block)."""
    m, k = x.shape
    k_blocks = triton.cdiv(k, block_k)
    xp = torch.empty(m, k_blocks * block_k, dtype=x.dtype, device=x.device)
    xs = torch.empty(m, k_blocks, dtype=torch.float32, device=x.device)
    return xp, xs


def x_planes(x: torch.Tensor, block_k: int, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`x_planes_buffers`, filled by :func:`x_planes_kernel`. pdl: the next kernel is launched as its
    programmatic dependent."""
    m, k = x.shape
    k_blocks = triton.cdiv(k, block_k)
    xp, xs = x_planes_buffers(x, block_k)
    x_planes_kernel[(m, k_blocks)](x, xp, xs, k, x.stride(0), xp.stride(0), xs.stride(0), BLOCK_K=block_k,
                                   PDL=pdl, num_warps=1)
    return xp, xs


def _launch_planes(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   g: int, block_k: int, cfg: WqConfig, out: torch.Tensor) -> torch.Tensor:
    """int4 through :func:`_w4_planes_kernel`, after the x pass that puts x in plane order."""
    m, k = x.shape
    n = weight.shape[0]
    k_blocks = triton.cdiv(k, block_k)
    pdl = x.is_cuda
    xp, xs = x_planes(x, block_k, pdl)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split = cfg.split_k or _splitk.auto_split(tiles, k_blocks, num_sms(x.device))
    target, split_stride = _splitk.target(out, split)
    zp = zero_point if zero_point is not None else scale
    w16 = weight.view(torch.int16)  # little-endian: 16-bit word w holds k = 4 w .. 4 w + 3
    tma = cfg.tma and tma_compatible(w16)
    _w4_planes_kernel[(tiles, split)](
        xp, xs,
        tile_descriptor(w16, (cfg.block_n, block_k // 4)) if tma else w16, scale, zp, target, m, n, k,
        group_blocks(g, block_k, k), split,
        xp.stride(0), xs.stride(0), w16.stride(0), scale.stride(0), zp.stride(0), target.stride(-2), split_stride,
        HAS_ZP=zero_point is not None, EVEN_K=k % block_k == 0, GROUP_M=8, INTERPRET=not x.is_cuda, PDL=pdl,
        TMA=tma, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, launch_pdl=pdl,
    )
    return _splitk.finish(out, target, split, pdl)


def _gemv_sub_words(group_size: int, g: int) -> int:
    """Words per GEMV sub-block: one scale group's worth, at most 128 values (16 words)."""
    return 16 if group_size == -1 else min(g, 128) // 8


def _gemv_tma_ok(weight: torch.Tensor, group_size: int) -> bool:
    """The GEMV's TMA boxes need 16-byte aligned rows, and its GW-word sub-blocks must tile K and never
    straddle a scale group (GW >= 4: a 16-byte sub-block)."""
    k = weight.shape[1] * 8
    g = resolve_group(group_size, k)
    gw = _gemv_sub_words(group_size, g)
    per_group = g // (gw * 8)  # sub-blocks per scale group: the kernel finds a group by a shift
    group_ok = group_size == -1 or (g % (gw * 8) == 0 and per_group & (per_group - 1) == 0)
    return weight.dtype == torch.int32 and gw >= 4 and (k // 8) % gw == 0 and group_ok and tma_compatible(weight)


# gemv._nibble's masks (nibble at bit 16 / 12) and the bits of 16.0 (run-time arguments, see the kernel)
_NIBBLE_BITS = (0xF0000, 0xF000, 0x41800000)


def _launch_phase_gemv(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int,
    g: int, cfg: WqConfig, out: torch.Tensor,
) -> torch.Tensor:
    """M = 1 through :func:`.gemv.w4_gemv_tma_kernel`, after one tiny pass that permutes x.

    A sub-block (GW words) never straddles a scale group (``_gemv_tma_ok`` checked that).
    """
    k = x.shape[1]
    n = weight.shape[0]
    gw = _gemv_sub_words(group_size, g)
    steps = triton.cdiv(k // 8, cfg.ng * gw)
    n_sub = steps * cfg.ng
    xp = torch.empty(n_sub * gw * 8, dtype=torch.float32, device=x.device)
    xs = torch.empty(2 * n_sub, dtype=torch.float32, device=x.device)
    pdl = x.is_cuda  # programmatic dependent launches (sm_90, as is the TMA this kernel needs)
    x_phase_kernel[(n_sub,)](x, xp, xs, k, n_sub, GW=gw, PDL=pdl, num_warps=1)
    tiles = triton.cdiv(n, cfg.block_n)
    split, per = _splitk.gemv_split(tiles, steps, num_sms(x.device), cfg.split_k)
    target, split_stride = _splitk.target(out, split)
    zp = zero_point if zero_point is not None else scale
    desc = tile_descriptor(weight, (cfg.block_n, cfg.ng * gw))
    sub_shift = 20 if group_size == -1 else (g // (gw * 8)).bit_length() - 1  # per channel: one group
    w4_gemv_tma_kernel[(tiles, split)](
        xp, xs, desc, scale, zp, target, n, k, per, scale.stride(0), zp.stride(0), split_stride, n_sub,
        *_NIBBLE_BITS,
        HAS_ZP=zero_point is not None, INTERPRET=not x.is_cuda, SUB_SHIFT=sub_shift, PDL=pdl,
        BLOCK_N=cfg.block_n, NG=cfg.ng, GW=gw, STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl,
    )
    return _splitk.finish(out, target, split, pdl)


def linear_wq(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int = 128,
    backend: Backend = "auto",
) -> torch.Tensor:
    """y = x @ dequant(W).T for packed int4 (int32 [N, K/8]) or int8 ([N, K]) weights.

    x: [..., K] bf16/fp16; scale: [N, K / group] (any float dtype); zero_point: same shape, ints in
    the signed q domain (w = (q - zp) * scale) or None for symmetric; group_size -1 = per channel.
    """
    on_triton = use_triton(backend, x, weight)
    check_wq_args(x, weight, scale, zero_point, group_size, on_triton)
    if not on_triton:
        return linear_wq_ref(x.reshape(-1, x.shape[-1]), weight, scale, zero_point, group_size).reshape(
            *x.shape[:-1], weight.shape[0]
        )
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    n = weight.shape[0]
    bucket = 1 << max(0, (m - 1).bit_length())
    key = ("wq", weight.dtype, x.dtype, bucket, n, k, group_size, zero_point is not None)
    run = lambda c: launch_wq(x2, weight, scale, zero_point, group_size, c)  # noqa: E731
    # built lazily: nothing may touch the host inside a CUDA-graph capture (a cached key never calls it)
    check = _checker(x2, weight, scale, zero_point, group_size) if x.is_cuda else None
    cold = lambda: [  # noqa: E731
        lambda c, o=o: launch_wq(x2, o[0], o[1], o[2], group_size, c)
        for o in _tuning.cold_copies(weight, scale, zero_point)
    ]
    cfg = _tuning.pick(key, lambda: _candidates(m, not x.is_cuda), run, x.is_cuda, check, cold)
    if _graphs.applicable(x2):  # decode: host-bound eagerly (see _graphs)
        call = lambda x2: launch_wq(x2, weight, scale, zero_point, group_size, cfg)  # noqa: E731
        y = _graphs.run((key, cfg), call, (x2,), (weight, scale, zero_point))
    else:
        y = launch_wq(x2, weight, scale, zero_point, group_size, cfg)
    return y.reshape(*x.shape[:-1], n)


# ||out - ref|| / ||ref|| a tuning candidate must meet (bf16 / fp16 output rounding, with margin).
_CHECK_TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


def _checker(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
             group_size: int):
    """For the tuner: run a candidate into a NaN-poisoned output; it passes if every element was
    written and its first and last (up to) 16 rows match the torch reference (fp32, computed once,
    in N chunks so the fp32 weight never exists whole)."""
    m = x.shape[0]
    n = weight.shape[0]
    ref: list[torch.Tensor] = []

    def check(cfg: WqConfig) -> bool:
        rows = torch.cat([torch.arange(min(m, 16)), torch.arange(max(min(m, 16), m - 16), m)]).to(x.device)
        if not ref:
            xs = x[rows]
            step = max(1, (1 << 26) // max(1, x.shape[1]))
            ref.append(torch.cat([
                linear_wq_ref(xs, weight[a:a + step], scale[a:a + step],
                              None if zero_point is None else zero_point[a:a + step], group_size).float()
                for a in range(0, n, step)
            ], dim=1))
        want = ref[0]
        if not bool(torch.isfinite(want).all()):
            return True  # inf / NaN input: nothing to judge by
        out = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
        launch_wq(x, weight, scale, zero_point, group_size, cfg, out=out)
        if bool(torch.isnan(out).any()):
            return False
        err = ((out[rows].float() - want).norm() / want.norm().clamp_min(1e-30)).item()
        return err < _CHECK_TOL.get(x.dtype, 1e-2)

    return check
