"""Batch-1 (M = 1) GEMV kernels on the CUDA cores, for int4 and block-FP8 weights.

At M = 1 an MMA wastes 15/16 of its work on padding, and feeding it forces the dequantized weight
through a register-layout conversion (shared memory) that costs more than the weight stream
itself. Here each thread multiplies the values it loaded, in the layout it loaded them:

* int4 (:func:`w4_gemv_phase_kernel`): words are used in the layout they were loaded in; nibble i
  of every word multiplies "phase i" of x (x[8 j + i]), which one tiny pass (:func:`x_phase_kernel`)
  lays out contiguously in fp32. Three instructions per weight (shift, and-or into the mantissa of
  16.0, FMA). On the H100 (18432, 7168) takes ~45 us (1.5 TB/s of int4 weights), vs ~110 us for the
  two earlier int4 GEMVs it replaces. Those unpacked through a [.., 8] broadcast axis
  (p[..., None] >> shifts, then a sum over it) against a bf16 x tile re-read as [.., 8] per word,
  five instructions per weight; the likely cost (not profiled) is that Triton spreads that axis over
  threads, so each step converted layouts through shared memory. Sweep (bench/explore): 8 warps,
  4 words per thread per step is best; 8-16 words per thread (more bytes in flight) got slower.
* fp8: weights upcast in registers; x is quantized per 128-block inside the kernel exactly as
  :func:`.fp8_block.quant_fp8_act` does, so the math is the reference's (fp8 x fp8 products are
  exact in fp32), only the summation order differs.

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
def fp8_gemv_wide_kernel(
    x_ptr, xq_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr,
    N, K, ITERS_PER_SPLIT, stride_wn, stride_wsn, stride_osplit,
    EVEN_K: tl.constexpr, INTERPRET: tl.constexpr, FMAX: tl.constexpr, FUSE_QUANT: tl.constexpr,
    BLOCK_N: tl.constexpr, NB: tl.constexpr,
):
    """M = 1 block-FP8 GEMV: NB 128-wide K blocks per step, the next step's weights in flight.

    With FUSE_QUANT the activation is quantized here per 128-block (as quant_fp8_act does); else it
    comes pre-quantized (xq fp8 [K], xs fp32 [K / 128]) from one tiny pass, which moves the per-step
    amax reductions out of every program. Same register double-buffering as w4_gemv_phase_kernel.
    """
    pid_k = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.minimum(offs_n, N - 1)
    offs_b = tl.arange(0, NB)
    offs_k = tl.arange(0, 128)
    STEP: tl.constexpr = NB * 128
    steps = tl.cdiv(K, STEP)
    s_begin = pid_k * ITERS_PER_SPLIT
    s_end = min(s_begin + ITERS_PER_SPLIT, steps)
    k_tile = offs_b[:, None] * 128 + offs_k[None, :]  # [NB, 128]
    w_rows = w_ptr + rn[:, None, None] * stride_wn
    ws_rows = ws_ptr + (rn // 128)[:, None] * stride_wsn
    acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    kk = s_begin * STEP + k_tile
    if EVEN_K:
        w = tl.load(w_rows + kk[None, :, :])
    else:
        w = tl.load(w_rows + kk[None, :, :], mask=kk[None, :, :] < K, other=0.0)
    for st in range(s_begin, s_end):
        kk = st * STEP + k_tile
        nxt = tl.where(st + 1 < s_end, kk + STEP, kk)
        if EVEN_K:
            w_next = tl.load(w_rows + nxt[None, :, :])
        else:
            w_next = tl.load(w_rows + nxt[None, :, :], mask=nxt[None, :, :] < K, other=0.0)
        kb = st * NB + offs_b  # [NB] K-block indices
        if FUSE_QUANT:
            if EVEN_K:
                x = tl.load(x_ptr + kk).to(tl.float32)
            else:
                x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            a_s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12), FMAX)  # [NB]
            xq = to_fp8e4(tl.math.div_rn(x, a_s[:, None]), INTERPRET).to(tl.float32)
        else:
            if EVEN_K:
                xq = tl.load(xq_ptr + kk).to(tl.float32)
            else:
                xq = tl.load(xq_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            a_s = tl.load(xs_ptr + kb, mask=kb * 128 < K, other=0.0)
        d = tl.sum(w.to(tl.float32) * xq[None, :, :], axis=2)  # [BLOCK_N, NB]
        w_s = tl.load(ws_rows + kb[None, :], mask=kb[None, :] * 128 < K, other=0.0)  # [BLOCK_N, NB]
        acc += d * (w_s * a_s[None, :])
        w = w_next
    out = cast_out(tl.sum(acc, axis=1), out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + pid_k * stride_osplit + offs_n, out, mask=offs_n < N)


@triton.jit
def x_phase_kernel(
    x_ptr, xp_ptr, xs_ptr, K,
    GW: tl.constexpr,
):
    """x [K] -> fp32 nibble-phase order for :func:`w4_gemv_phase_kernel`, plus per-sub-block sums.

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
def w4_gemv_phase_kernel(
    xp_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    N, K, group_size, ITERS_PER_SPLIT, stride_wn, stride_sn, stride_zn, stride_osplit,
    HAS_ZP: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr,
):
    """M = 1 int4 GEMV on the CUDA cores, three instructions per weight, words never unpacked to K order.

    A step streams [BLOCK_N, NG, GW] packed words (16-byte vectors per thread, the next step's words
    already loading: register double-buffering; Triton does not software-pipeline loads that feed
    no tl.dot). Nibble i of every word
    multiplies phase i of x (pre-permuted by :func:`x_phase_kernel`, so each phase is a contiguous
    [NG, GW] fp32 tile), so the words keep the layout they were loaded in: no [.., 8] broadcast axis
    and no layout conversion. Each nibble becomes fp32 16 + u with one shift and one and-or
    (u moved to the top of the mantissa of 16.0), then one FMA; the offset comes off once per
    sub-block: sum_k (16 + u_k) x_k - 24 sum_k x_k = sum_k q_k x_k (q = u - 8), times the group
    scale (minus zp * scale * sum x for asymmetric weights).
    """
    pid_k = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.minimum(offs_n, N - 1)
    offs_g = tl.arange(0, NG)
    offs_w = tl.arange(0, GW)
    STEP: tl.constexpr = NG * GW  # words per row per step
    words = K // 8
    steps = tl.cdiv(words, STEP)
    s_begin = pid_k * ITERS_PER_SPLIT
    s_end = min(s_begin + ITERS_PER_SPLIT, steps)
    kw_tile = offs_g[:, None] * GW + offs_w[None, :]  # [NG, GW] word offsets inside a step
    x_tile = offs_g[:, None] * (GW * 8) + offs_w[None, :]  # phase 0 of each sub-block in xp
    w_rows = w_ptr + rn[:, None, None] * stride_wn
    acc = tl.zeros((BLOCK_N, NG, GW), dtype=tl.float32)
    oacc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    kw = s_begin * STEP + kw_tile
    if EVEN_K:
        p = tl.load(w_rows + kw[None, :, :])
    else:
        p = tl.load(w_rows + kw[None, :, :], mask=kw[None, :, :] < words, other=0)
    for st in range(s_begin, s_end):
        kw = st * STEP + kw_tile
        nxt = tl.where(st + 1 < s_end, kw + STEP, kw)  # clamped prefetch; discarded on the last step
        if EVEN_K:
            p_next = tl.load(w_rows + nxt[None, :, :])
        else:
            p_next = tl.load(w_rows + nxt[None, :, :], mask=nxt[None, :, :] < words, other=0)
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
        g = tl.minimum((st * STEP * 8 + offs_g * GW * 8) // group_size, (K - 1) // group_size)  # [NG]
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :]).to(tl.float32)  # [BLOCK_N, NG]
        xs = tl.load(xs_ptr + st * NG + offs_g)  # [NG]
        acc += d * s[:, :, None]
        if HAS_ZP:
            z = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :]).to(tl.float32)
            oacc += s * (24.0 + z) * xs[None, :]
        else:
            oacc += s * (24.0 * xs[None, :])
        p = p_next
    tot = tl.sum(tl.sum(acc, axis=2), axis=1) - tl.sum(oacc, axis=1)
    out = cast_out(tot, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + pid_k * stride_osplit + offs_n, out, mask=offs_n < N)
