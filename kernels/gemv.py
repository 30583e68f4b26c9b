"""Batch-1 (M = 1) GEMV kernels on the CUDA cores, for int4 and block-FP8 weights.

At M = 1 an MMA wastes 15/16 of its work on padding, and feeding it forces the dequantized weight
through a register-layout conversion (shared memory) that costs more than the weight stream
itself. Here each thread multiplies the values it loaded, in the layout it loaded them:

* int4: a [BLOCK_N, BLOCK_K / 8] tile of words is broadcast against the 8 nibble shifts, so a
  thread's 8 values per word stay in its registers. ``(u | 0x4B000000)`` reinterpreted as fp32 is
  2^23 + u exactly, so q = that - (2^23 + 8) costs one add (no int->float convert); then one FMA.
  Group scales apply per [BLOCK_N] partial sum (a K block never straddles a group).
* fp8: weights upcast in registers; x is quantized per 128-block inside the kernel exactly as
  :func:`.fp8_block.quant_fp8_act` does, so the math is the reference's (fp8 x fp8 products are
  exact in fp32), only the summation order differs.

Split-K as in the GEMM kernels, into the same fp32 workspace.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tl import cast_out, to_fp8e4


@triton.jit
def w4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    N, K, group_size, SPLIT_K, stride_wn, stride_sn, stride_zn, stride_osplit,
    HAS_ZP: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.minimum(offs_n, N - 1)
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_i = tl.arange(0, 8)
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_start = pid_k * per_split
    kb_end = min(kb_start + per_split, k_blocks)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        kw = k0 // 8 + offs_w
        kx = k0 + offs_w[:, None] * 8 + offs_i[None, :]  # [BLOCK_K / 8, 8], K order
        if EVEN_K:
            p = tl.load(w_ptr + rn[:, None] * stride_wn + kw[None, :])
            x = tl.load(x_ptr + kx).to(tl.float32)
        else:
            p = tl.load(w_ptr + rn[:, None] * stride_wn + kw[None, :], mask=kw[None, :] < K // 8, other=0)
            x = tl.load(x_ptr + kx, mask=kx < K, other=0.0).to(tl.float32)
        u = ((p[:, :, None] >> (offs_i * 4)[None, None, :]) & 0xF) | 0x4B000000
        q = u.to(tl.float32, bitcast=True) - 8388616.0  # (2^23 + u) - (2^23 + 8) = u - 8 = q
        d = tl.sum(tl.sum(q * x[None, :, :], axis=2), axis=1)
        g = k0 // group_size
        s = tl.load(s_ptr + rn * stride_sn + g).to(tl.float32)
        if HAS_ZP:
            z = tl.load(z_ptr + rn * stride_zn + g).to(tl.float32)
            d = d - z * tl.sum(tl.sum(x, axis=1), axis=0)
        acc += s * d
    out = cast_out(acc, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + pid_k * stride_osplit + offs_n, out, mask=offs_n < N)


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
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_start = pid_k * per_split
    kb_end = min(kb_start + per_split, k_blocks)
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
def w4_gemv_wide_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    N, K, group_size, ITERS_PER_SPLIT, stride_wn, stride_sn, stride_zn, stride_osplit,
    HAS_ZP: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr,
):
    """M = 1 int4 GEMV streaming [BLOCK_N, NG * GW] words per step, the next step's words in flight.

    Why this shape: the older kernel above moves 16 words (64 B) per row per step and waits on each
    load before using it, so too few bytes are in flight to cover HBM latency (1.1 TB/s measured).
    Here a step is NG sub-blocks of GW words (GW * 8 values, never straddling a scale group), loaded
    as [BLOCK_N, NG, GW] (16-byte vectors per thread) while the previous step computes (manual
    register double-buffering: Triton does not software-pipeline loads that feed no tl.dot). The
    accumulator keeps the [BLOCK_N, NG, GW] shape so no cross-thread reduction runs inside the loop.
    """
    pid_k = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.minimum(offs_n, N - 1)
    offs_g = tl.arange(0, NG)
    offs_w = tl.arange(0, GW)
    offs_i = tl.arange(0, 8)
    STEP: tl.constexpr = NG * GW  # words per row per step
    words = K // 8
    steps = tl.cdiv(words, STEP)
    s_begin = pid_k * ITERS_PER_SPLIT
    s_end = min(s_begin + ITERS_PER_SPLIT, steps)
    kw_tile = offs_g[:, None] * GW + offs_w[None, :]  # [NG, GW] word offsets inside a step
    w_rows = w_ptr + rn[:, None, None] * stride_wn
    kx_tile = kw_tile[:, :, None] * 8 + offs_i[None, None, :]  # [NG, GW, 8] value offsets
    acc = tl.zeros((BLOCK_N, NG, GW), dtype=tl.float32)
    zacc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    kw = s_begin * STEP + kw_tile
    if EVEN_K:
        p = tl.load(w_rows + kw[None, :, :])
    else:
        p = tl.load(w_rows + kw[None, :, :], mask=kw[None, :, :] < words, other=0)
    for st in range(s_begin, s_end):
        kw = st * STEP + kw_tile
        kw_next = kw + STEP
        # Prefetch the next step (clamped to the last valid step; its values are discarded).
        if EVEN_K:
            nxt = tl.where(st + 1 < s_end, kw_next, kw)
            p_next = tl.load(w_rows + nxt[None, :, :])
            x = tl.load(x_ptr + st * STEP * 8 + kx_tile).to(tl.float32)
        else:
            nxt = tl.where(st + 1 < s_end, kw_next, kw)
            p_next = tl.load(w_rows + nxt[None, :, :], mask=nxt[None, :, :] < words, other=0)
            kx = st * STEP * 8 + kx_tile
            x = tl.load(x_ptr + kx, mask=kx < K, other=0.0).to(tl.float32)
        u = ((p[:, :, :, None] >> (offs_i * 4)[None, None, None, :]) & 0xF) | 0x4B000000
        q = u.to(tl.float32, bitcast=True) - 8388616.0  # (2^23 + u) - (2^23 + 8) = u - 8
        d = tl.sum(q * x[None, :, :, :], axis=3)  # [BLOCK_N, NG, GW]
        g = tl.minimum((st * STEP * 8 + offs_g * GW * 8) // group_size, (K - 1) // group_size)  # [NG]
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :]).to(tl.float32)  # [BLOCK_N, NG]
        acc += d * s[:, :, None]
        if HAS_ZP:
            z = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :]).to(tl.float32)
            xs = tl.sum(tl.sum(x, axis=2), axis=1)  # [NG]
            zacc += z * s * xs[None, :]
        p = p_next
    tot = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_ZP:
        tot -= tl.sum(zacc, axis=1)
    out = cast_out(tot, out_ptr.dtype.element_ty, INTERPRET)
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
    amax reductions out of every program. Same register double-buffering as w4_gemv_wide_kernel.
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
