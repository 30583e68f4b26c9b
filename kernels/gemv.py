"""Batch-1 (M = 1) GEMV kernels on the CUDA cores, for int4 and block-FP8 weights.

At M = 1 an MMA wastes 15/16 of its work on padding, and feeding it forces the dequantized weight
through a register-layout conversion (shared memory) that costs more than the weight stream
itself. Here each thread multiplies the values it loaded, in the layout it loaded them:

* int4 (:func:`w4_gemv_tma_kernel`): words are used in the layout they were loaded in; nibble i
  of every word multiplies "phase i" of x (x[8 j + i]), which one tiny pass (:func:`x_phase_kernel`)
  lays out contiguously in fp32. Three instructions per weight (shift, and-or into the mantissa of
  16.0, FMA). Gathering the phases straight from x with stride-8 loads instead (one launch less)
  measured 46-48 us vs 39-40 on (18432, 7168) on the H100, and gained under 1 us on small shapes.
* fp8 (:func:`fp8_gemv_tma_kernel`): weights upcast in registers; x quantized per 128-block by
  :func:`.fp8_block.quant_fp8_act` first, so the math is the reference's (fp8 x fp8 products are
  exact in fp32), only the summation order differs. :func:`fp8_gemv_kernel` (x quantized inside,
  plain loads) serves shapes TMA cannot describe.

Why TMA: a GEMV is a pure weight stream, and on an H100 it needs ~20 KB in flight per SM to reach
HBM bandwidth. Loading into registers (the earlier kernels double-buffered one step by hand) ties
those bytes to registers: the int4 kernel needed 80 registers, so 3 programs per SM, 37% occupancy,
and ncu showed warps stalled on the loads 47% of the time at 1.4 TB/s (46 us on (18432, 7168)).
A TMA descriptor load inside ``tl.range(num_stages=S)`` is pipelined by Triton into an S-deep
shared-memory ring filled by the copy engine, so the bytes in flight no longer cost registers:
38-40 us there (1.7-1.8 TB/s), and 16-20 vs 23 us on (24576, 1536) in same-run sweeps. The same
change to the MMA kernels (w4a16.py) gained nothing: they are bound by the dequant-to-MMA layout
conversion, not by latency.
Loading x through TMA as well was much slower (67 us): x is tiny and L1-resident.

Split-K as in the GEMM kernels, into the same fp32 workspace.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tl import cast_out, split_k_range, to_fp8e4


@triton.jit
def fp8_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, out_ptr,
    N, K, SPLIT_K, stride_wn, stride_wsn, stride_osplit,
    EVEN_K: tl.constexpr, INTERPRET: tl.constexpr, FMAX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.minimum(offs_n, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    kb_start, kb_end = split_k_range(pid_k, K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        kk = k0 + offs_k
        if EVEN_K:
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :])
            x = tl.load(x_ptr + kk).to(tl.float32)
        else:
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=kk[None, :] < K, other=0.0)
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        a_s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), FMAX)
        xq = to_fp8e4(tl.math.div_rn(x, a_s), INTERPRET).to(tl.float32)
        d = tl.sum(w.to(tl.float32) * xq[None, :], axis=1)
        acc += d * (tl.load(ws_ptr + (rn // BLOCK_K) * stride_wsn + kb) * a_s)
    out = cast_out(acc, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + pid_k * stride_osplit + offs_n, out, mask=offs_n < N)


@triton.jit
def fp8_gemv_tma_kernel(
    xq_ptr, xs_ptr, w_desc, ws_ptr, out_ptr,
    N, K, ITERS_PER_SPLIT, stride_wsn, stride_osplit,
    INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, STAGES: tl.constexpr,
):
    """M = 1 block-FP8 GEMV: NB 128-wide K blocks per step, weights streamed by TMA through a STAGES-deep
    shared-memory ring.

    x comes pre-quantized (xq fp8 [K], xs fp32 [K / 128]) from one tiny pass. w_desc views the weight
    as [N, K / 128, 128] (block [BLOCK_N, NB, 128]); TMA zero-fills rows past N and blocks past K.
    """
    pid_k = tl.program_id(1)
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    rn = tl.minimum(offs_n, N - 1)
    offs_b = tl.arange(0, NB)
    STEP: tl.constexpr = NB * 128
    steps = tl.cdiv(K, STEP)
    s_begin = pid_k * ITERS_PER_SPLIT
    s_end = min(s_begin + ITERS_PER_SPLIT, steps)
    k_tile = offs_b[:, None] * 128 + tl.arange(0, 128)[None, :]  # [NB, 128]
    ws_rows = ws_ptr + (rn // 128)[:, None] * stride_wsn
    kblocks = tl.cdiv(K, 128)
    acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    for st in tl.range(s_begin, s_end, num_stages=STAGES):
        w = w_desc.load([n0, st * NB, 0])  # [BLOCK_N, NB, 128] fp8
        kk = st * STEP + k_tile
        kb = st * NB + offs_b  # [NB] K-block indices
        xq = tl.load(xq_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        a_s = tl.load(xs_ptr + kb, mask=kb < kblocks, other=0.0)
        d = tl.sum(w.to(tl.float32) * xq[None, :, :], axis=2)  # [BLOCK_N, NB]
        w_s = tl.load(ws_rows + kb[None, :], mask=kb[None, :] < kblocks, other=0.0)
        acc += d * (w_s * a_s[None, :])
    out = cast_out(tl.sum(acc, axis=1), out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + pid_k * stride_osplit + offs_n, out, mask=offs_n < N)


@triton.jit
def x_phase_kernel(
    x_ptr, xp_ptr, xs_ptr, K,
    GW: tl.constexpr,
):
    """x [K] -> fp32 nibble-phase order for :func:`w4_gemv_tma_kernel`, plus per-sub-block sums.

    Sub-block b covers words b * GW .. b * GW + GW - 1 (values 8 * b * GW ..); inside it, phase i
    (value 8 j + i of word j) is stored contiguously: xp[b, i, j] = x[8 (b GW + j) + i]. Values past
    K are zero, so the GEMV can read whole steps. xs[b] = sum of the sub-block's values.
    """
    b = tl.program_id(0)
    offs_j = tl.arange(0, GW)
    offs_i = tl.arange(0, 8)
    kx = (b * GW + offs_j[:, None]) * 8 + offs_i[None, :]  # [GW, 8]
    x = tl.load(x_ptr + kx, mask=kx < K, other=0.0).to(tl.float32)
    tl.store(xp_ptr + b * GW * 8 + offs_i[None, :] * GW + offs_j[:, None], x)
    tl.store(xs_ptr + b, tl.sum(tl.sum(x, axis=1), axis=0))


@triton.jit
def w4_gemv_tma_kernel(
    xp_ptr, xs_ptr, w_desc, s_ptr, z_ptr, out_ptr,
    N, K, ITERS_PER_SPLIT, stride_sn, stride_zn, stride_osplit,
    HAS_ZP: tl.constexpr, INTERPRET: tl.constexpr, SUB_SHIFT: tl.constexpr,
    BLOCK_N: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr, STAGES: tl.constexpr,
):
    """M = 1 int4 GEMV on the CUDA cores, three instructions per weight, words never unpacked to K order.

    A step takes [BLOCK_N, NG, GW] packed words from a STAGES-deep shared-memory ring that TMA fills
    (w_desc views the weight as [N, K / (8 GW), GW] words; rows past N and sub-blocks past K arrive
    as zeros). Nibble i of every word multiplies phase i of x (pre-permuted by :func:`x_phase_kernel`,
    so each phase is a contiguous [NG, GW] fp32 tile), so the words keep the layout they were read
    in: no [.., 8] broadcast axis and no layout conversion. Each nibble becomes fp32 16 + u with one
    shift and one and-or (u moved to the top of the mantissa of 16.0), then one FMA; the offset comes
    off once per sub-block: sum_k (16 + u_k) x_k - 24 sum_k x_k = sum_k q_k x_k (q = u - 8), times
    the group scale (minus zp * scale * sum x for asymmetric weights). Sub-block b lies in scale
    group b >> SUB_SHIFT (a sub-block never straddles a group; per channel, SUB_SHIFT is large).
    """
    pid_k = tl.program_id(1)
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    rn = tl.minimum(offs_n, N - 1)
    offs_g = tl.arange(0, NG)
    STEP: tl.constexpr = NG * GW  # words per row per step
    steps = tl.cdiv(K // 8, STEP)
    s_begin = pid_k * ITERS_PER_SPLIT
    s_end = min(s_begin + ITERS_PER_SPLIT, steps)
    last_group = (K // 8 - 1) // (GW << SUB_SHIFT)
    x_tile = offs_g[:, None] * (GW * 8) + tl.arange(0, GW)[None, :]  # phase 0 of each sub-block in xp
    acc = tl.zeros((BLOCK_N, NG, GW), dtype=tl.float32)
    oacc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    for st in tl.range(s_begin, s_end, num_stages=STAGES):
        p = w_desc.load([n0, st * NG, 0])  # [BLOCK_N, NG, GW] words
        xb = xp_ptr + st * (STEP * 8) + x_tile
        for i in tl.static_range(8):
            if 4 * i <= 19:
                t = p << (19 - 4 * i)
            else:
                t = p >> (4 * i - 19)
            wv = ((t & 0x780000) | 0x41800000).to(tl.float32, bitcast=True)  # 16 + u, exact
            xi = tl.load(xb + i * GW)
            if i == 0:
                d = wv * xi[None, :, :]
            else:
                d += wv * xi[None, :, :]
        g = tl.minimum((st * NG + offs_g) >> SUB_SHIFT, last_group)  # [NG]
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :]).to(tl.float32)  # [BLOCK_N, NG]
        xs = tl.load(xs_ptr + st * NG + offs_g)  # [NG]
        acc += d * s[:, :, None]
        if HAS_ZP:
            z = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :]).to(tl.float32)
            oacc += s * (24.0 + z) * xs[None, :]
        else:
            oacc += s * (24.0 * xs[None, :])
    tot = tl.sum(tl.sum(acc, axis=2), axis=1) - tl.sum(oacc, axis=1)
    out = cast_out(tot, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + pid_k * stride_osplit + offs_n, out, mask=offs_n < N)
