"""Fused MoE expert GEMMs: all routed experts in one launch per projection.

Pipeline for T tokens routed to k of E experts (no host sync, no Python loop over experts):

1. :func:`moe_prep` (one Triton launch): its program 0 counts tokens per expert, pads each expert's
   count to a multiple of BLOCK_M, and writes ``sorted_ids`` (flat (token, slot) indices grouped by
   expert, padding = T*k) plus the expert of every BLOCK_M-row block; its other programs put x into
   the form the gate/up GEMM reads (plane order for int4, fp8 per token per 128 for block-FP8). The
   grid of the GEMMs is sized from the worst case (ceil(T*k/BLOCK_M) + min(E, T*k) blocks) so nothing
   is read back to the host; surplus blocks exit at once.
2. gate/up GEMM: each program gathers BLOCK_M token rows of x for one expert and computes the gate
   *and* the up tile for the same BLOCK_N columns, storing silu(gate) * up (the [T*k, 2I]
   pre-activation never touches memory).
3. down GEMM on the intermediate, scaled by the routing weight in the epilogue.
4. torch sums the k slots per token.

At decode sizes (T <= ``_graphs.MAX_ROWS``) an eager call replays steps 1-4 from a cached CUDA graph
(:mod:`._graphs`): its host time, not the GPU's, bounded those calls.

Weight formats (chosen from w13's dtype): bf16/fp16; packed int4 (pack-quantized layout, group
scales, optional zero points); block-FP8 (activations quantized per token per 128 first, as in
:mod:`.fp8_block`). The per-format inner step and the tiling follow :mod:`.w4a16` (swap-AB:
acc[BLOCK_N, BLOCK_M], dequantized weights are the register operand). int4 plane mode (unpack 3,
as ``w4a16._w4_planes_kernel``): the words are read as int16 and dequantized in the wgmma A registers;
x is put in plane order once (step 1), and the gate/up GEMM writes the intermediate in plane order
(``OUT_PLANES``) for the down GEMM, padded to whole K blocks (slots past K are masked on load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _graphs, _tuning
from ._dispatch import Backend, check_activations, group_blocks, tile_descriptor, tma_compatible, use_triton
from ._tl import cast_out, int4_dot_permuted, int4_plane16, int4_words_to_magic, mma
from .fp8_block import fp8_act_buffers, fp8_act_quant_tile, fp8_act_rows, quant_fp8_act
from .reference import FP8_BLOCK, FP8_MAX, moe_experts_ref, resolve_group
from .w4a16 import MAGIC, int4_unpack, x_planes_buffers, x_planes_tile

FMT_PLAIN, FMT_INT4, FMT_FP8 = 0, 1, 2


def _fmt(w: torch.Tensor) -> int:
    """Expert weight format, from its dtype."""
    return FMT_INT4 if w.dtype == torch.int32 else FMT_FP8 if w.dtype == torch.float8_e4m3fn else FMT_PLAIN


ACT_AS_IS, ACT_PLANES, ACT_FP8 = 0, 1, 2  # what the prep kernel makes of x for the gate/up GEMM


@triton.jit
def _moe_prep_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr, npp_ptr, scratch_ptr,
    numel, E, max_blocks,
    x_ptr, a_ptr, as_ptr, T, K, stride_xm, stride_am, stride_as,
    BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr, BCHUNK: tl.constexpr,
    ACT: tl.constexpr, ACT_ROWS: tl.constexpr, ACT_BLOCK_K: tl.constexpr, FMAX: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Everything the expert GEMMs need before they start, in one launch: program 0 aligns the routing,
    programs 1.. (one per ACT_ROWS rows x ACT_BLOCK_K-wide K block of x) put x into the gate/up GEMM's
    form (plane order for int4, per-token-per-128 fp8 for block-FP8; nothing to do for bf16). A
    decode step's eager time is its launch count: each Triton launch costs ~50 us of host time on the
    lent VM, against 100-150 us of GPU time for a whole int4 / fp8 MoE layer at T = 1.
    """
    pid = tl.program_id(0)
    if pid == 0:
        _align(ids_ptr, sorted_ptr, block_expert_ptr, npp_ptr, scratch_ptr, numel, E, max_blocks,
               BLOCK_M, E_P2, CHUNK, BCHUNK)
    else:
        kblocks = tl.cdiv(K, ACT_BLOCK_K)
        rb = (pid - 1) // kblocks
        kb = (pid - 1) % kblocks
        if ACT == 1:
            x_planes_tile(x_ptr, a_ptr, as_ptr, rb, kb, K, stride_xm, stride_am, stride_as, ACT_BLOCK_K)
        elif ACT == 2:
            fp8_act_quant_tile(x_ptr, a_ptr, as_ptr, rb, kb, T, K, stride_xm, stride_am, stride_as,
                               ACT_ROWS, ACT_BLOCK_K, FMAX, INTERPRET)


@triton.jit
def _align(
    ids_ptr, sorted_ptr, block_expert_ptr, npp_ptr, scratch_ptr, numel, E, max_blocks,
    BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr, BCHUNK: tl.constexpr,
):
    """Routing alignment, by one program. scratch (int32 [3 * E_P2]) = counts | padded starts | fill cursors,
    zeroed here and ids read in whatever integer type the router gave: each torch op that did either
    beforehand (a memset, an int64 -> int32 copy) was one more launch on the host path."""
    offs_e = tl.arange(0, E_P2)
    tl.store(scratch_ptr + offs_e, tl.zeros((E_P2,), dtype=tl.int32))
    tl.store(scratch_ptr + 2 * E_P2 + offs_e, tl.zeros((E_P2,), dtype=tl.int32))
    tl.debug_barrier()
    for start in range(0, numel, CHUNK):
        o = start + tl.arange(0, CHUNK)
        eid = tl.load(ids_ptr + o, mask=o < numel, other=0)
        tl.atomic_add(scratch_ptr + eid, 1, mask=o < numel)
    tl.debug_barrier()
    counts = tl.load(scratch_ptr + offs_e, mask=offs_e < E, other=0)
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    ends = tl.cumsum(padded, 0)
    tl.store(scratch_ptr + E_P2 + offs_e, ends - padded)
    tl.store(npp_ptr, tl.sum(padded, 0))
    for start in range(0, max_blocks * BLOCK_M, CHUNK):
        o = start + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + o, tl.zeros((CHUNK,), dtype=tl.int32) + numel, mask=o < max_blocks * BLOCK_M)
    # Block b belongs to the first expert whose padded range ends after row b * BLOCK_M.
    for b0 in range(0, max_blocks, BCHUNK):
        b = b0 + tl.arange(0, BCHUNK)
        before = (ends[None, :] <= (b * BLOCK_M)[:, None]) & (offs_e < E)[None, :]
        expert = tl.minimum(tl.sum(before.to(tl.int32), axis=1), E - 1)
        tl.store(block_expert_ptr + b, expert, mask=b < max_blocks)
    tl.debug_barrier()
    for start in range(0, numel, CHUNK):
        o = start + tl.arange(0, CHUNK)
        eid = tl.load(ids_ptr + o, mask=o < numel, other=0)
        rank = tl.atomic_add(scratch_ptr + 2 * E_P2 + eid, 1, mask=o < numel)
        base = tl.load(scratch_ptr + E_P2 + eid, mask=o < numel, other=0)
        tl.store(sorted_ptr + base + rank, o, mask=o < numel)


def max_blocks(numel: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum_e ceil(count_e / BLOCK_M) over any routing of ``numel`` slots."""
    return triton.cdiv(numel, block_m) + min(num_experts, numel)


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_ids int32 [max_blocks * block_m], block_expert int32 [max_blocks], num_padded int32 [1])."""
    return moe_prep(topk_ids, num_experts, block_m, topk_ids, ACT_AS_IS, 0)[0]


def moe_prep(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, x: torch.Tensor, act: int, act_block_k: int
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """(moe_align's three tensors, the gate/up GEMM's activations, their per-block sums or fp8 scales), from
    one :func:`_moe_prep_kernel` launch; ``act`` is ACT_AS_IS (x itself, no sums), ACT_PLANES or ACT_FP8."""
    ids = topk_ids.reshape(-1)
    numel = ids.numel()
    nb = max_blocks(numel, num_experts, block_m)
    e_p2 = triton.next_power_of_2(num_experts)
    # one allocation for the four int32 arrays (each torch.empty is host time on the decode path)
    buf = torch.empty(nb * block_m + nb + 1 + 3 * e_p2, dtype=torch.int32, device=ids.device)
    sorted_ids, block_expert, npp, scratch = buf.split([nb * block_m, nb, 1, 3 * e_p2])
    a, a_s, rows, programs = x, None, 1, 0
    if act == ACT_PLANES:
        a, a_s = x_planes_buffers(x, act_block_k)
    elif act == ACT_FP8:
        a, a_s = fp8_act_buffers(x)
        rows = fp8_act_rows(x.shape[0])
    if act != ACT_AS_IS:
        programs = triton.cdiv(x.shape[0], rows) * triton.cdiv(x.shape[1], act_block_k)
    a_arg = a_s if a_s is not None else a
    _moe_prep_kernel[(1 + programs,)](
        ids, sorted_ids, block_expert, npp, scratch, numel, num_experts, nb,
        x, a, a_arg, x.shape[0], x.shape[-1], x.stride(0), a.stride(0), a_arg.stride(0),
        BLOCK_M=block_m, E_P2=e_p2, CHUNK=256, BCHUNK=max(1, 4096 // e_p2),
        ACT=act, ACT_ROWS=rows, ACT_BLOCK_K=max(act_block_k, 16), FMAX=FP8_MAX, INTERPRET=not x.is_cuda,
        num_warps=4,
    )
    return (sorted_ids, block_expert, npp), a, a_s


@triton.jit
def _expert_tile(
    w_base, s_base, z_base, rows, row0, srows, k0, K, at, a_rows, a_s, xsum, GROUP_BLOCKS,
    stride_wn, stride_sn, stride_zn, TMA: tl.constexpr,
    FMT: tl.constexpr, HAS_ZP: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_VAL: tl.constexpr,
    EVEN_K: tl.constexpr, INTERPRET: tl.constexpr, DTYPE: tl.constexpr, UNPACK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Scaled contribution [BLOCK_N, BLOCK_M] of one K block of one expert's weight rows."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if FMT == 1:
        if UNPACK == 3:  # int16 words, activations in plane order (see w4a16._w4_planes_kernel): d sums (u - 8) x
            W: tl.constexpr = BLOCK_K // 4
            offs_w = tl.arange(0, W)
            kw = k0 // 4 + offs_w
            if TMA:  # w_base: descriptor over all experts' rows, [BLOCK_N, W] boxes from row row0
                p = w_base.load([row0, k0 // 4])
            else:
                ptrs = w_base + rows[:, None] * stride_wn + kw[None, :]
                p = tl.load(ptrs) if EVEN_K else tl.load(ptrs, mask=kw[None, :] < K // 4, other=0)
            d = tl.zeros((BLOCK_N, a_rows.shape[1]), dtype=tl.float32)
            for i in tl.static_range(4):
                if EVEN_K:
                    xi = tl.load(a_rows + (k0 + i * W + offs_w)[:, None])
                else:  # plane slot w of plane i holds k0 + 4 w + i
                    xi = tl.load(a_rows + (k0 + i * W + offs_w)[:, None],
                                 mask=(k0 + 4 * offs_w + i)[:, None] < K, other=0.0)
                d = mma(int4_plane16(p, i, DTYPE, INTERPRET), xi, INTERPRET, d)
            off = 0.0
        else:  # d sums (MAGIC + u) x
            kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            ptrs = w_base + rows[:, None] * stride_wn + kw[None, :]
            p = tl.load(ptrs) if EVEN_K else tl.load(ptrs, mask=kw[None, :] < K // 8, other=0)
            if UNPACK == 2:
                d = int4_dot_permuted(p, a_rows, k0, K, MAGIC_BITS, DTYPE, EVEN_K, INTERPRET, BLOCK_K)
            else:
                d = mma(int4_words_to_magic(p, BLOCK_N, BLOCK_K, MAGIC_BITS, DTYPE, UNPACK), at, INTERPRET)
            off = MAGIC_VAL + 8.0
        g = k0 // BLOCK_K // GROUP_BLOCKS
        s = tl.load(s_base + rows * stride_sn + g).to(tl.float32)
        if HAS_ZP:
            zoff = off + tl.load(z_base + rows * stride_zn + g).to(tl.float32)
            res = s[:, None] * (d - zoff[:, None] * xsum[None, :])
        elif UNPACK == 3:
            res = s[:, None] * d
        else:
            res = s[:, None] * (d - off * xsum[None, :])
    else:
        ptrs = w_base + rows[:, None] * stride_wn + offs_k[None, :]
        w = tl.load(ptrs) if EVEN_K else tl.load(ptrs, mask=offs_k[None, :] < K, other=0.0)
        d = mma(w, at, INTERPRET)
        if FMT == 2:
            ws = tl.load(s_base + srows * stride_sn + k0 // BLOCK_K)
            res = d * ws[:, None] * a_s[None, :]
        else:
            res = d
    return res


@triton.jit
def _moe_gemm_kernel(
    a_ptr, as_ptr, w_ptr, s_ptr, z_ptr, out_ptr, topk_w_ptr,
    sorted_ptr, block_expert_ptr, npp_ptr,
    N, K, numel, GROUP_BLOCKS, up_row, up_srow, rows_per_expert,
    stride_am, stride_as, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn, stride_om,
    TOPK: tl.constexpr, A_PER_TOKEN: tl.constexpr, FUSE_SILU: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    OUT_PLANES: tl.constexpr, TMA: tl.constexpr,
    FMT: tl.constexpr, HAS_ZP: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_VAL: tl.constexpr,
    EVEN_K: tl.constexpr, INTERPRET: tl.constexpr, UNPACK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    if pid_m * BLOCK_M >= tl.load(npp_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    ids = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = ids < numel
    arow = tl.where(valid, ids // TOPK if A_PER_TOKEN else ids, 0)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.minimum(offs_n, N - 1)
    srn = rn // 128  # fp8 weight-scale row of each output row (blocks are 128 x 128)
    if TMA:
        w_base = w_ptr
        row0 = expert.to(tl.int32) * rows_per_expert + pid_n * BLOCK_N
    else:
        w_base = w_ptr + expert * stride_we
        row0 = 0
    s_base = s_ptr + expert * stride_se
    z_base = z_ptr + expert * stride_ze
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + arow[None, :].to(tl.int64) * stride_am
    a_ptrs = a_rows + offs_k[:, None]  # [BLOCK_K, BLOCK_M]
    dtype = a_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    a_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if FMT == 1 and UNPACK == 3:
            at = a_s  # (unused: the plane MMAs load their own slices of a)
        elif EVEN_K:
            at = tl.load(a_ptrs + k0)
        else:
            at = tl.load(a_ptrs + k0, mask=(k0 + offs_k)[:, None] < K, other=0.0)
        if FMT == 2:
            a_s = tl.load(as_ptr + (k0 // BLOCK_K) * stride_as + arow)
        if FMT == 1 and (UNPACK != 3 or HAS_ZP):
            if UNPACK == 3:  # a is in plane order: slot j of the block holds k0 + 4 (j % W) + j // W
                kk = k0 + 4 * (offs_k % (BLOCK_K // 4)) + offs_k // (BLOCK_K // 4)
                at = tl.load(a_ptrs + k0, mask=kk[:, None] < K, other=0.0)
            xsum = tl.sum(at.to(tl.float32), axis=0)
        acc += _expert_tile(
            w_base, s_base, z_base, rn, row0, srn, k0, K, at, a_rows, a_s, xsum, GROUP_BLOCKS,
            stride_wn, stride_sn, stride_zn, TMA,
            FMT, HAS_ZP, MAGIC_BITS, MAGIC_VAL, EVEN_K, INTERPRET, dtype, UNPACK, BLOCK_N, BLOCK_K,
        )
        if FUSE_SILU:
            acc_up += _expert_tile(
                w_base, s_base, z_base, up_row + rn, row0 + up_row, up_srow + srn, k0, K, at, a_rows, a_s, xsum,
                GROUP_BLOCKS, stride_wn, stride_sn, stride_zn, TMA,
                FMT, HAS_ZP, MAGIC_BITS, MAGIC_VAL, EVEN_K, INTERPRET, dtype, UNPACK, BLOCK_N, BLOCK_K,
            )

    if FUSE_SILU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(topk_w_ptr + ids, mask=valid, other=0.0).to(tl.float32)[None, :]
    cols = offs_n
    if OUT_PLANES > 0:  # written in plane order for the next GEMM's OUT_PLANES-wide K blocks
        cols = (offs_n // OUT_PLANES) * OUT_PLANES + (offs_n % 4) * (OUT_PLANES // 4) + (offs_n % OUT_PLANES) // 4
    out_ptrs = out_ptr + ids[None, :].to(tl.int64) * stride_om + cols[:, None]
    y = cast_out(acc, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptrs, y, mask=valid[None, :] & (offs_n[:, None] < N))


@dataclass(frozen=True)
class MoeConfig:
    block_m: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    unpack: int = 0  # int4 unpacking mode, as in w4a16.WqConfig (3: 16-bit words, plane-ordered activations)
    tma: bool = False  # with unpack 3: the words arrive by TMA (where a descriptor can view them)


def _candidates(slots_per_expert: float, fmt: int, interpret: bool) -> list[MoeConfig]:
    if interpret:
        return [MoeConfig(16, 32, 4, 1)]
    bms = (16,) if slots_per_expert <= 16 else (16, 32) if slots_per_expert <= 48 else (32, 64)
    if fmt == FMT_INT4:
        # H100, 2026-11-28 (DeepSeek-V3 sizes, 256 experts, top-8; CUDA graphs): plane mode beat the best other
        # unpack at every T (T = 1 210 -> 124 us, 16 1417 -> 1124, 64 3177 -> 2516, 256 3758 -> 2953,
        # 512 4975 -> 3231), and its words through TMA beat it again in a second run (T = 1 126 -> 110,
        # 16 1252 -> 965, 64 2412 -> 1860, 256 2952 -> 2280, 512 3257 -> 2670). The K-permuted unpack stays for
        # group sizes under 64, where plane mode falls back to unpack 1.
        return [MoeConfig(bm, bn, 4, st, 3, tma=True) for bm in bms for bn in (64, 128) for st in (3, 4)] + [
            MoeConfig(bm, 64, 4, 4, 3) for bm in bms] + [MoeConfig(bm, 128, 4, 3, 2) for bm in bms]
    return [MoeConfig(bm, bn, 4, 3) for bm in bms for bn in (64, 128)]


def _weight_args(w: torch.Tensor, scale: torch.Tensor | None, zp: torch.Tensor | None) -> tuple:
    s = scale if scale is not None else w
    z = zp if zp is not None else s
    return (w, s, z, w.stride(0), w.stride(1), s.stride(0), s.stride(1), z.stride(0), z.stride(1))


def _gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    w: torch.Tensor,
    scale: torch.Tensor | None,
    zp: torch.Tensor | None,
    out: torch.Tensor,
    topk_w: torch.Tensor,
    align: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    n: int,
    k: int,
    topk: int,
    group_size: int,
    fuse_silu: bool,
    act_dtype: torch.dtype,
    cfg: MoeConfig,
    out_planes: int = 0,
) -> None:
    fmt = _fmt(w)
    g = resolve_group(group_size, k) if fmt == FMT_INT4 else k
    block_k = _block_k(fmt, group_size, k)
    unpack = _unpack(cfg, fmt, block_k, a.is_cuda)
    tma = False
    if unpack == 3:
        w = w.view(torch.int16)  # little-endian: 16-bit word w holds k = 4 w .. 4 w + 3
        flat = w.view(-1, w.shape[2]) if w.is_contiguous() else w[0]
        tma = cfg.tma and w.is_contiguous() and tma_compatible(flat)
    sorted_ids, block_expert, npp = align
    nb = block_expert.numel()
    magic_bits, magic_val = MAGIC[act_dtype]
    wt, s, z, swe, swn, sse, ssn, sze, szn = _weight_args(w, scale, zp)
    a_s = a_scale if a_scale is not None else a
    if tma:
        wt = tile_descriptor(flat, (cfg.block_n, block_k // 4))
    _moe_gemm_kernel[(nb * triton.cdiv(n, cfg.block_n),)](
        a, a_s, wt, s, z, out, topk_w,
        sorted_ids, block_expert, npp,
        n, k, topk_w.numel(), group_blocks(g, block_k, k), n, triton.cdiv(n, 128), w.shape[1],
        a.stride(0), a_s.stride(0), swe, swn, sse, ssn, sze, szn, out.stride(0),
        TOPK=topk, A_PER_TOKEN=fuse_silu, FUSE_SILU=fuse_silu, MUL_WEIGHT=not fuse_silu, OUT_PLANES=out_planes, TMA=tma,
        FMT=fmt, HAS_ZP=zp is not None, MAGIC_BITS=magic_bits, MAGIC_VAL=magic_val,
        EVEN_K=k % block_k == 0, INTERPRET=not a.is_cuda, UNPACK=unpack,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _block_k(fmt: int, group_size: int, k: int) -> int:
    """K step: one fp8 scale block; an int4 step never straddles a scale group (a divisor of it)."""
    if fmt == FMT_FP8:
        return FP8_BLOCK
    if fmt == FMT_INT4 and group_size != -1:
        return math.gcd(128, resolve_group(group_size, k))
    return 128 if fmt == FMT_INT4 else 64


def _unpack(cfg: MoeConfig, fmt: int, block_k: int, on_cuda: bool) -> int:
    return int4_unpack(cfg.unpack, block_k, on_cuda) if fmt == FMT_INT4 else 0


def launch_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    w13_zero_point: torch.Tensor | None,
    w2_zero_point: torch.Tensor | None,
    group_size: int,
    cfg: MoeConfig,
    poison: float | None = None,
) -> torch.Tensor:
    """Run the whole routed-expert MLP with one config (``poison`` fills scratch, for tests)."""
    t, hidden = x.shape
    topk = topk_ids.shape[1]
    num_experts = w13.shape[0]
    inter = w2.shape[2] * (8 if w2.dtype == torch.int32 else 1)
    fmt = _fmt(w13)
    fp8 = fmt == FMT_FP8
    topk_w = topk_weights.reshape(-1).contiguous()
    bk13, bk2 = _block_k(fmt, group_size, hidden), _block_k(fmt, group_size, inter)
    planes13 = _unpack(cfg, fmt, bk13, x.is_cuda) == 3
    planes2 = _unpack(cfg, fmt, bk2, x.is_cuda) == 3
    act = ACT_FP8 if fp8 else ACT_PLANES if planes13 else ACT_AS_IS
    align, a, a_s = moe_prep(topk_ids, num_experts, cfg.block_m, x, act, bk13)
    # plane modes: each GEMM reads its activations in plane order (slots past K are masked off)
    h = torch.empty(t * topk, triton.cdiv(inter, bk2) * bk2 if planes2 else inter, dtype=x.dtype, device=x.device)
    y = torch.empty(t * topk, hidden, dtype=x.dtype, device=x.device)
    if poison is not None:
        h.fill_(poison)
        y.fill_(poison)
    a_s = a_s if fp8 else None  # (int4 planes: the block sums are for zero points, which re-sum x per block)
    _gemm(a, a_s, w13, w13_scale, w13_zero_point, h, topk_w, align, inter, hidden, topk, group_size, True,
          x.dtype, cfg, out_planes=bk2 if planes2 else 0)
    a, a_s = quant_fp8_act(h) if fp8 else (h, None)
    _gemm(a, a_s, w2, w2_scale, w2_zero_point, y, topk_w, align, hidden, inter, topk, group_size, False,
          x.dtype, cfg)
    return y.view(t, topk, hidden).sum(dim=1)


def _check_args(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
    w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None, w13_zero_point: torch.Tensor | None,
    w2_zero_point: torch.Tensor | None, group_size: int, triton_path: bool,
) -> None:
    """Shapes and dtypes, before anything runs (see ``_dispatch.check_wq_args`` for why: a kernel reads out of
    bounds where a shape disagrees). Expert ids are not range-checked: that needs a device sync."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, hidden], got {list(x.shape)}")
    t, hidden = x.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_ids.is_floating_point() or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be integer [T = {t}, k], got {topk_ids.dtype} {list(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights must be {list(topk_ids.shape)} like topk_ids, got {list(topk_weights.shape)}")
    fmt = _fmt(w13)
    per = 8 if fmt == FMT_INT4 else 1
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expert weights must be 3-D, got w13 {list(w13.shape)}, w2 {list(w2.shape)}")
    e, inter = w13.shape[0], w13.shape[1] // 2
    if (w2.dtype != w13.dtype or w2.shape[0] != e or w13.shape[1] % 2 or w13.shape[2] * per != hidden
            or tuple(w2.shape[1:]) != (hidden, inter // per)):
        packed = "int32 packed int4: last dim / 8, " if per == 8 else ""
        raise ValueError(f"expert weights must be w13 [E, 2I, H] and w2 [E, H, I] ({packed}one dtype) for hidden "
                         f"H = {hidden}, got w13 {w13.dtype} {list(w13.shape)}, w2 {w2.dtype} {list(w2.shape)}")
    check_activations(x, hidden, half_only=triton_path)
    if fmt == FMT_PLAIN:
        return
    if fmt == FMT_INT4:
        g13, g2 = hidden // resolve_group(group_size, hidden), inter // resolve_group(group_size, inter)
        want = {"w13": [e, 2 * inter, g13], "w2": [e, hidden, g2]}
    else:
        c = lambda v: -(-v // FP8_BLOCK)  # noqa: E731
        want = {"w13": [e, 2 * c(inter), c(hidden)], "w2": [e, c(hidden), c(inter)]}
    for name, scale, zp in (("w13", w13_scale, w13_zero_point), ("w2", w2_scale, w2_zero_point)):
        if scale is None or list(scale.shape) != want[name]:
            got = "none" if scale is None else list(scale.shape)
            raise ValueError(f"{name}_scale must be {want[name]} for these experts, got {got}")
        if zp is not None and list(zp.shape) != want[name]:
            raise ValueError(f"{name}_zero_point must be {want[name]} for these experts, got {list(zp.shape)}")


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_zero_point: torch.Tensor | None = None,
    w2_zero_point: torch.Tensor | None = None,
    group_size: int = 128,
    backend: Backend = "auto",
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * Expert_{topk_ids[t, j]}(x[t]) for every token (see module doc).

    Shapes: x [T, H]; topk_ids / topk_weights [T, k]; w13 [E, 2I, H] (gate rows then up rows;
    int4: int32 [E, 2I, H/8] + scales [E, 2I, H/G] + optional zero points; fp8: float8_e4m3fn +
    scales [E, 2*ceil(I/128), ceil(H/128)], gate's grid then up's); w2 [E, H, I] likewise.
    """
    args = (x, topk_ids, topk_weights, w13, w2)
    args += (w13_scale, w2_scale, w13_zero_point, w2_zero_point, group_size)
    on_triton = use_triton(backend, x, w13)
    _check_args(*args, on_triton)
    if not on_triton:
        return moe_experts_ref(*args)
    x = x.contiguous()
    slots = topk_ids.numel() / w13.shape[0]
    bucket = 1 << max(0, (x.shape[0] - 1).bit_length())
    key = ("moe", w13.dtype, x.dtype, bucket, topk_ids.shape[1], *w13.shape, *w2.shape)
    fixed = (w13, w2, w13_scale, w2_scale, w13_zero_point, w2_zero_point)
    call = lambda x, ids, tw, c: launch_moe(x, ids, tw, *fixed, group_size, c)  # noqa: E731
    cands = lambda: _candidates(slots, _fmt(w13), not x.is_cuda)  # noqa: E731
    cfg = _tuning.pick(key, cands, lambda c: call(x, topk_ids, topk_weights, c), x.is_cuda)
    if _graphs.applicable(x):  # decode: host-bound eagerly (see _graphs)
        replayed = lambda x, ids, tw: call(x, ids, tw, cfg)  # noqa: E731
        return _graphs.run((key, group_size, cfg), replayed, (x, topk_ids, topk_weights), fixed)
    return call(x, topk_ids, topk_weights, cfg)
