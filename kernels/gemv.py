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
