"""Batch-1 (M = 1) GEMV kernels on the CUDA cores, for int4 and block-FP8 weights.

At M = 1 an MMA wastes 15/16 of its work on padding, and feeding it forces the dequantized weight
through a register-layout conversion (shared memory) that costs more than the weight stream
itself. Here each thread multiplies the values it loaded, in the layout it loaded them:

* int4 (:func:`w4_gemv_tma_kernel`): words are used in the layout they were loaded in; nibble i
  of every word multiplies "phase i" of x (x[8 j + i]), which one tiny pass (:func:`x_phase_kernel`)
  lays out contiguously in fp32 (pre-scaled to match :func:`_nibble`). An and-or and an FMA per
  weight plus a shift per two weights. Gathering the phases straight from x with stride-8 loads
  instead (one launch less) measured 46-48 us vs 39-40 on (18432, 7168) on the H100 (before the
  nibble change), and gained under 1 us on small shapes.
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

Then, on (18432, 7168), in same-run sweeps against the kernel before each change: fewer instructions per
weight (:func:`_nibble`, masks as arguments) 36.2 -> 34.1 us; programmatic dependent launch of the
GEMV behind its x pass (and of the split-K sum behind the GEMV) -> 32.6 us, and 11.4 -> 9.0 us on
(2048, 7168) where launches weigh most; scales loaded a step ahead plus (32 rows, 2 warps, 4 sub-blocks,
3 stages) -> 32.5 us (3.0x cuBLAS bf16). What bounds it now (ncu): 60-64% of DRAM bandwidth, 22%
occupancy (registers and the shared-memory ring), and the largest stall (30% of samples) is warps
waiting on the TMA barrier for weight bytes, the next (12%) the scale loads; about 45% issue use.
Scales and x sums laid out as [BLOCK_N, NG, 1] (no layout conversion) took 168 registers and lost.

Split-K as in the GEMM kernels, into the same fp32 workspace.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

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
def _gemv_program(N, STEPS, ITERS_PER_SPLIT, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """This GEMV program's share (axis 0: row blocks, axis 1: K splits): (pid_k, first row, row
    offsets, row offsets clamped in bounds, first step, end step). PDL: the kernel was launched as a
    programmatic dependent of the x pass before it; wait for that pass here, before any read of x,
    and let the next kernel (the split-K sum) launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid_k = tl.program_id(1)
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    s_begin = pid_k * ITERS_PER_SPLIT
    return pid_k, n0, offs_n, tl.minimum(offs_n, N - 1), s_begin, min(s_begin + ITERS_PER_SPLIT, STEPS)


@triton.jit
def fp8_gemv_tma_kernel(
    xq_ptr, xs_ptr, w_desc, ws_ptr, out_ptr,
    N, K, ITERS_PER_SPLIT, stride_wsn, stride_osplit,
    INTERPRET: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, STAGES: tl.constexpr,
):
    """M = 1 block-FP8 GEMV: NB 128-wide K blocks per step, weights streamed by TMA through a STAGES-deep
    shared-memory ring.

    x comes pre-quantized (xq fp8 [K], xs fp32 [K / 128]) from one tiny pass (PDL: launched as its
    programmatic dependent, waiting for it on the device). w_desc views the weight as [N, K / 128, 128]
    (block [BLOCK_N, NB, 128]); TMA zero-fills rows past N and blocks past K.
    """
    STEP: tl.constexpr = NB * 128
    pid_k, n0, offs_n, rn, s_begin, s_end = _gemv_program(N, tl.cdiv(K, STEP), ITERS_PER_SPLIT, BLOCK_N, PDL)
    offs_b = tl.arange(0, NB)
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
def x_phase_kernel(x_ptr, xp_ptr, xs_ptr, K, N_SUB, GW: tl.constexpr, PDL: tl.constexpr):
    """x [K] -> fp32 nibble-phase order for :func:`w4_gemv_tma_kernel`, plus per-sub-block offset sums.

    Sub-block b covers words b * GW .. b * GW + GW - 1 (values 8 * b * GW ..); inside it, phase i
    (value 8 j + i of word j) is stored contiguously: xp[b, i, j] = c_i x[8 (b GW + j) + i], where
    c_i (8 for even i, 128 for odd) undoes the scale :func:`_nibble` leaves on nibble i. Values past K
    are zero, so the GEMV can read whole steps. xs[b] = sum_i (16 c_i + 8) S_i (S_i the sum of phase
    i) is the offset the GEMV subtracts per sub-block; xs[N_SUB + b] = sum_i S_i, for zero points.
    """
    if PDL:
        gdc_launch_dependents()  # lets the GEMV launch now; it waits for these stores on the device
    b = tl.program_id(0)
    offs_j = tl.arange(0, GW)
    offs_i = tl.arange(0, 8)
    kx = (b * GW + offs_j[:, None]) * 8 + offs_i[None, :]  # [GW, 8]
    x = tl.load(x_ptr + kx, mask=kx < K, other=0.0).to(tl.float32)
    c = tl.where((offs_i % 2) == 0, 8.0, 128.0)
    tl.store(xp_ptr + b * GW * 8 + offs_i[None, :] * GW + offs_j[:, None], x * c[None, :])
    s_i = tl.sum(x, axis=0)  # [8]
    tl.store(xs_ptr + b, tl.sum(s_i * (16.0 * c + 8.0), axis=0))
    tl.store(xs_ptr + N_SUB + b, tl.sum(s_i, axis=0))


@triton.jit
def _nibble(p, i: tl.constexpr, MASK_EVEN, MASK_ODD, MAGIC):
    """Nibble i (unsigned, u) of every word p as the exact fp32 16 + u / c_i, c_i = 8 (even i) or 128 (odd).

    The and-or with MAGIC (the bits of 16.0) makes a float whose mantissa holds u at bit 16 (even i) or
    12 (odd i), both inside the mantissa, so only one shift is needed per two nibbles: p itself has
    nibbles 3 and 4 there, p << 8 nibbles 1 and 2, p >> 8 nibbles 5 and 6, p rotated by 16 (one funnel
    shift) nibbles 7 and 0. Moving each nibble to the top of the mantissa instead (c_i = 1) took a
    shift per nibble; in an sm_90 compile the loop went from ~4.7 to ~3.6 instructions per weight.
    The cost is accumulation bits (the offset 16 c_i x is up to 2048 x against u x): 6e-5 relative
    error on a 7168-long g128 row in an fp32 simulation, 20x under bf16's output rounding, and on the
    H100 2-4e-4 relative difference from the fp32 reference after both round to bf16 (1e-6 to 2e-4
    before, depending on the shape).
    """
    if i == 3 or i == 4:
        t = p
    elif i == 1 or i == 2:
        t = p << 8
    elif i == 5 or i == 6:
        t = p >> 8
    else:
        t = (p << 16) | (p.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True)
    if i % 2 == 0:
        return ((t & MASK_EVEN) | MAGIC).to(tl.float32, bitcast=True)
    else:
        return ((t & MASK_ODD) | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def w4_gemv_tma_kernel(
    xp_ptr, xs_ptr, w_desc, s_ptr, z_ptr, out_ptr,
    N, K, ITERS_PER_SPLIT, stride_sn, stride_zn, stride_osplit, N_SUB, MASK_EVEN, MASK_ODD, MAGIC,
    HAS_ZP: tl.constexpr, INTERPRET: tl.constexpr, SUB_SHIFT: tl.constexpr, PDL: tl.constexpr,
    BLOCK_N: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr, STAGES: tl.constexpr,
):
    """M = 1 int4 GEMV on the CUDA cores, words never unpacked to K order.

    A step takes [BLOCK_N, NG * GW] packed words (viewed as [BLOCK_N, NG, GW]) from a STAGES-deep
    shared-memory ring that TMA fills (w_desc: the [N, K / 8] weight itself, 2-D boxes; rows past N and
    words past K arrive as zeros). 2-D boxes measured 11.8 vs 12.4 us on (24576, 1536) against a 3-D
    [N, K / (8 GW), GW] view with [BLOCK_N, NG, GW] boxes, and within noise elsewhere.
    Nibble i of every word multiplies phase i of x (pre-permuted by :func:`x_phase_kernel`, so each
    phase is a contiguous [NG, GW] fp32 tile), so the words keep the layout they were read in: no
    [.., 8] broadcast axis and no layout conversion. Each nibble becomes an exact fp32 by
    :func:`_nibble` (an and-or, plus a shift per two nibbles), then one FMA with its pre-scaled x.
    The offset comes off once per sub-block: sum_k (16 + u_k / c_k) c_k x_k - sum_i (16 c_i + 8) S_i
    = sum_k q_k x_k (q = u - 8, c_k the c_i of k's phase), times the group scale (minus
    zp * scale * sum x for asymmetric weights). Sub-block b lies in scale group b >> SUB_SHIFT (a
    sub-block never straddles a group; per channel, SUB_SHIFT is large).
    MASK_EVEN, MASK_ODD and MAGIC are run-time arguments, not literals: with literal masks ptxas
    re-materialized a mask into a register before most and-ors (0.6-0.9 extra instructions per weight
    in an sm_90 compile); an argument is read from the constant bank in place.
    PDL: launched as a programmatic dependent of :func:`x_phase_kernel`, so the launch and prologue
    overlap that pass; ``gdc_wait`` holds every read of x until it has finished.
    """
    STEP: tl.constexpr = NG * GW  # words per row per step
    pid_k, n0, offs_n, rn, s_begin, s_end = _gemv_program(N, tl.cdiv(K // 8, STEP), ITERS_PER_SPLIT, BLOCK_N, PDL)
    offs_g = tl.arange(0, NG)
    last_group = (K // 8 - 1) // (GW << SUB_SHIFT)
    x_tile = offs_g[:, None] * (GW * 8) + tl.arange(0, GW)[None, :]  # phase 0 of each sub-block in xp
    acc = tl.zeros((BLOCK_N, NG, GW), dtype=tl.float32)
    oacc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    s_rows = s_ptr + rn[:, None] * stride_sn
    z_rows = z_ptr + rn[:, None] * stride_zn
    # bf16 scales are too narrow for the pipeliner's cp.async, so a plain load in the loop would wait out
    # a DRAM latency every step: each step's scales (and zero points) are loaded one step ahead instead
    g = tl.minimum((s_begin * NG + offs_g) >> SUB_SHIFT, last_group)
    s_nx = tl.load(s_rows + g[None, :])
    if HAS_ZP:
        z_nx = tl.load(z_rows + g[None, :])
    for st in tl.range(s_begin, s_end, num_stages=STAGES):
        p = w_desc.load([n0, st * STEP]).reshape(BLOCK_N, NG, GW)  # [BLOCK_N, NG, GW] words
        xb = xp_ptr + st * (STEP * 8) + x_tile
        for i in tl.static_range(8):
            wv = _nibble(p, i, MASK_EVEN, MASK_ODD, MAGIC)
            xi = tl.load(xb + i * GW)
            if i == 0:
                d = wv * xi[None, :, :]
            else:
                d += wv * xi[None, :, :]
        s = s_nx.to(tl.float32)  # [BLOCK_N, NG]
        g = tl.minimum(((st + 1) * NG + offs_g) >> SUB_SHIFT, last_group)
        s_nx = tl.load(s_rows + g[None, :])
        xs = tl.load(xs_ptr + st * NG + offs_g)  # [NG]
        acc += d * s[:, :, None]
        if HAS_ZP:
            z = z_nx.to(tl.float32)
            z_nx = tl.load(z_rows + g[None, :])
            xz = tl.load(xs_ptr + N_SUB + st * NG + offs_g)  # [NG] plain sums
            oacc += s * (xs[None, :] + z * xz[None, :])
        else:
            oacc += s * xs[None, :]
    tot = tl.sum(tl.sum(acc, axis=2), axis=1) - tl.sum(oacc, axis=1)
    out = cast_out(tot, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + pid_k * stride_osplit + offs_n, out, mask=offs_n < N)
