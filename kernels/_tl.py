"""Triton device helpers shared by the GEMM kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mma(a, b, INTERPRET: tl.constexpr, acc=None):
    """tl.dot with fp32 accumulation; in the CPU interpreter, through fp32 operands.

    Triton 3.9's interpreter keeps bf16 as raw uint16 bits and multiplies those bits in tl.dot,
    so there the operands are upcast first (exact for bf16/fp16). On the GPU this is a plain MMA.
    """
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _nibble(p, i: tl.constexpr, MAGIC_BITS: tl.constexpr, DTYPE: tl.constexpr):
    """Nibble i of every word as the 16-bit float MAGIC + u (exact; no int->float convert).

    u = q + 8 is the stored nibble; OR-ing it into the mantissa of MAGIC (128.0 in bf16, 1024.0 in
    fp16, where one ulp is 1) and reinterpreting the bits gives MAGIC + u.
    """
    return (((p >> (4 * i)) & 0xF) | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)


@triton.jit
def int4_words_to_magic(
    p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAGIC_BITS: tl.constexpr, DTYPE: tl.constexpr,
    UNPACK: tl.constexpr = 0,
):
    """[BLOCK_N, BLOCK_K // 8] packed words -> [BLOCK_N, BLOCK_K] values MAGIC + u in K order.

    UNPACK 0: broadcast the words against 8 shifts and reshape (Triton may route the reshape
    through shared memory). UNPACK 1: build the K order with a tree of tl.join (k = 8j + 4a + 2b + c
    from the innermost join outwards), which keeps each word's 8 values in one thread.
    """
    if UNPACK == 0:
        shifts = tl.arange(0, 8) * 4
        u = ((p[:, :, None] >> shifts[None, None, :]) & 0xF) | MAGIC_BITS
        return tl.reshape(u, (BLOCK_N, BLOCK_K)).to(tl.int16).to(DTYPE, bitcast=True)
    even = tl.join(
        tl.join(_nibble(p, 0, MAGIC_BITS, DTYPE), _nibble(p, 4, MAGIC_BITS, DTYPE)),
        tl.join(_nibble(p, 2, MAGIC_BITS, DTYPE), _nibble(p, 6, MAGIC_BITS, DTYPE)),
    )
    odd = tl.join(
        tl.join(_nibble(p, 1, MAGIC_BITS, DTYPE), _nibble(p, 5, MAGIC_BITS, DTYPE)),
        tl.join(_nibble(p, 3, MAGIC_BITS, DTYPE), _nibble(p, 7, MAGIC_BITS, DTYPE)),
    )
    return tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))


@triton.jit
def int4_dot_permuted(
    p, x_ptrs, k0, K, MAGIC_BITS: tl.constexpr, DTYPE: tl.constexpr, EVEN_K: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """sum_k (MAGIC + u[n, k]) * x[m, k] over one K block, never putting nibbles back in K order.

    A dot product does not care in which order K is visited, so nibble plane i (k = 8j + i for all
    words j) is multiplied with the matching stride-8 slice of x: 8 MMAs of depth BLOCK_K / 8, no
    reshape or interleave. p: [BLOCK_N, BLOCK_K // 8] words; x_ptrs: [1, BLOCK_M] row pointers.
    """
    offs = tl.arange(0, BLOCK_K // 8) * 8
    for i in tl.static_range(8):
        kk = k0 + offs + i
        if EVEN_K:
            xi = tl.load(x_ptrs + kk[:, None])
        else:
            xi = tl.load(x_ptrs + kk[:, None], mask=kk[:, None] < K, other=0.0)
        part = mma(_nibble(p, i, MAGIC_BITS, DTYPE), xi, INTERPRET)
        if i == 0:
            d = part
        else:
            d += part
    return d


@triton.jit
def int4_plane16(p, i: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Nibble i of 16-bit words (4 nibbles each) as the signed value u - 8, exactly, in DTYPE.

    Kept purely elementwise at 16 bits (no narrowing cast, one unary op on the GPU), so Triton's
    dot-operand optimization can load the words from shared memory straight into the wgmma
    A-operand registers and dequantize there. On the GPU one inline-PTX op handles two words per
    32-bit register: shift, and-or the nibble into the mantissa of 128.0 (bf16) / 1024.0 (fp16),
    where one ulp is 1, then subtract 136 / 1032 with a packed fma: 3 instructions per 2 values.
    """
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (a constexpr comparison; the dtype must stay on the left)
        magic: tl.constexpr = 0x4300
        off: tl.constexpr = 136.0
        dq: tl.constexpr = ("lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA; mov.b32 one, 0x3F803F80; "
                            "mov.b32 off, 0xC308C308; fma.rn.bf16x2 $0, t, one, off; }")
    else:
        magic: tl.constexpr = 0x6400
        off: tl.constexpr = 1032.0
        dq: tl.constexpr = ("lop3.b32 t, t, 0x000F000F, 0x64006400, 0xEA; mov.b32 one, 0x3C003C00; "
                            "mov.b32 off, 0xE408E408; fma.rn.f16x2 $0, t, one, off; }")
    if INTERPRET:
        return ((((p >> (4 * i)) & 0xF) | magic).to(DTYPE, bitcast=True).to(tl.float32) - off).to(DTYPE)
    if i == 0:
        shift: tl.constexpr = "{ .reg .b32 t, one, off; mov.b32 t, $1; "
    elif i == 1:
        shift: tl.constexpr = "{ .reg .b32 t, one, off; shr.b32 t, $1, 4; "
    elif i == 2:
        shift: tl.constexpr = "{ .reg .b32 t, one, off; shr.b32 t, $1, 8; "
    else:
        shift: tl.constexpr = "{ .reg .b32 t, one, off; shr.b32 t, $1, 12; "
    return tl.inline_asm_elementwise(shift + dq, "=r,r", [p], dtype=DTYPE.value, is_pure=True, pack=2)


@triton.jit
def to_fp8e4(y, INTERPRET: tl.constexpr):
    """fp32 -> float8_e4m3fn, correctly rounded (to nearest even), like torch's ``.to()``.

    The fp32 bits are first rounded to e4m3's 3 mantissa bits (add half an ulp, truncate), so the
    cast that follows is exact. Without this, Triton's GPU cast rounds twice (fp32 -> fp16 -> fp8),
    which flips ~1/128 of the values by one fp8 ulp versus torch (seen on an H100, triton 3.6),
    and the CPU interpreter mis-rounds when rounding carries into the exponent (1.96 -> 1.0).
    """
    b = y.to(tl.int32, bitcast=True)
    b = (b + 0x7FFFF + ((b >> 20) & 1)) & -1048576
    return b.to(tl.float32, bitcast=True).to(tl.float8e4nv)


@triton.jit
def cast_out(y, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> output dtype, round to nearest even.

    The interpreter truncates fp32 -> bf16 (doubling the error the tests see); there the bits are
    rounded first so the truncating cast is exact. On the GPU this is the plain (RNE) cast.
    """
    if INTERPRET:  # noqa: SIM102 (nested: both conditions must stay compile-time constants)
        if DTYPE == tl.bfloat16:  # noqa: SIM300
            b = y.to(tl.int32, bitcast=True)
            y = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return y.to(DTYPE)


@triton.jit
def gemm_tile(M, N, K, SPLIT_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              GROUP_M: tl.constexpr):
    """This program's tile of a split-K GEMM grid (axis 0: tiles, axis 1: K splits):
    (pid_k, pid_n, offs_m, offs_n, rm, rn, kb_start, kb_end). Tiles go in grouped order: GROUP_M row-blocks
    share each weight panel while it is hot in L2, instead of every row-block sweeping all of N
    before the next starts. rm / rn are the offsets clamped in bounds (loads need no mask; the
    store masks), [kb_start, kb_end) the K-blocks of this split."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    gsize = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % gsize
    pid_n = (pid % per_group) // gsize
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kb_start, kb_end = split_k_range(pid_k, K, SPLIT_K, BLOCK_K)
    return pid_k, pid_n, offs_m, offs_n, tl.minimum(offs_m, M - 1), tl.minimum(offs_n, N - 1), kb_start, kb_end


@triton.jit
def split_k_range(pid_k, K, SPLIT_K, BLOCK_K: tl.constexpr):
    """The [start, end) K-blocks that split `pid_k` of SPLIT_K reduces (the last split may be short)."""
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_start = pid_k * per_split
    return kb_start, min(kb_start + per_split, k_blocks)
