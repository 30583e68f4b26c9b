"""Block-FP8 GEMM in DeepSeek-V3's scheme, activation quantization included.

Weights: float8_e4m3fn [N, K] with fp32 ``weight_scale_inv`` [ceil(N/128), ceil(K/128)].
Activations: quantized on the fly to fp8 with one scale per token per 128-wide K block
(:func:`quant_fp8_act`, one read of x, one write of q and the scales). The GEMM then runs the fp8
tensor-core MMA over one 128-deep K block at a time and applies both scales to that block's fp32
partial before accumulating, which is exactly the math of the reference (scale per K-block, fp32
accumulation). Same swap-AB tiling as :mod:`.w4a16`: acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile.T, so
decode-sized M is the narrow MMA side.

Activation scales are stored K-block-major ([ceil(K/128), M]) so a program's BLOCK_M scales for
one K block are one contiguous load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from . import _graphs, _splitk, _tuning
from ._dispatch import Backend, check_fp8_block_args, num_sms, row_blocks_descriptor, tma_compatible, use_triton
from ._tl import cast_out, gemm_tile, mma, to_fp8e4
from .gemv import fp8_gemv_kernel, fp8_gemv_tma_kernel
from .reference import FP8_BLOCK, FP8_MAX, linear_fp8_block_ref


@triton.jit
def fp8_act_quant_tile(
    x_ptr, q_ptr, s_ptr, rb, kb, M, K, stride_xm, stride_qm, stride_sk,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, FMAX: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Rows rb * ROWS .. of x, K block kb: fp8 values and one scale per row (amax / FMAX, IEEE division as
    torch's)."""
    offs_m = rb * ROWS + tl.arange(0, ROWS)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12), FMAX)
    q = to_fp8e4(tl.math.div_rn(x, s[:, None]), INTERPRET)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + kb * stride_sk + offs_m, s, mask=offs_m < M)


@triton.jit
def _fp8_act_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sk,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, FMAX: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()  # the GEMV after may launch now; it waits for these stores on the device
    fp8_act_quant_tile(x_ptr, q_ptr, s_ptr, tl.program_id(0), tl.program_id(1), M, K, stride_xm, stride_qm,
                       stride_sk, ROWS, BLOCK_K, FMAX, INTERPRET)


def fp8_act_buffers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (fp8 [M, K], fp32 scales [ceil(K/128), M]) for x [M, K]."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    return q, torch.empty(triton.cdiv(k, FP8_BLOCK), m, dtype=torch.float32, device=x.device)


def fp8_act_rows(m: int) -> int:
    """Rows per program of the activation quantization."""
    return 4 if m >= 4 else 1


def quant_fp8_act(x: torch.Tensor, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], fp32 scales [ceil(K/128), M]) (note: K-block-major scales).

    ``pdl``: the next kernel is launched as its programmatic dependent (sm_90+; CUDA only).
    """
    m, k = x.shape
    q, s = fp8_act_buffers(x)
    rows = fp8_act_rows(m)
    _fp8_act_quant_kernel[(triton.cdiv(m, rows), triton.cdiv(k, FP8_BLOCK))](
        x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0), ROWS=rows, BLOCK_K=FP8_BLOCK, FMAX=FP8_MAX,
        INTERPRET=not x.is_cuda, PDL=pdl and x.is_cuda,
        num_warps=1 if rows == 1 else 2,
    )
    return q, s


@triton.jit
def _fp8_block_gemm_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr,
    M, N, K, SPLIT_K,
    stride_xm, stride_xs, stride_wn, stride_wsn, stride_om, stride_osplit,
    EVEN_K: tl.constexpr, GROUP_M: tl.constexpr, INTERPRET: tl.constexpr, FUSE_QUANT: tl.constexpr,
    FMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SCALAR_WS: tl.constexpr = False,
):
    pid_k, pid_n, offs_m, offs_n, rm, rn, kb_start, kb_end = gemm_tile(
        M, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
    )
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = xq_ptr + rm[None, :] * stride_xm + offs_k[:, None]  # [BLOCK_K, BLOCK_M]
    w_ptrs = w_ptr + rn[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    ws_ptrs = ws_ptr + (rn // BLOCK_K) * stride_wsn  # weight blocks are BLOCK_K (=128) rows tall too
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        if EVEN_K:
            xt = tl.load(x_ptrs + k0)
            w = tl.load(w_ptrs + k0)
        else:
            kmask = (k0 + offs_k) < K
            xt = tl.load(x_ptrs + k0, mask=kmask[:, None], other=0.0)
            w = tl.load(w_ptrs + k0, mask=kmask[None, :], other=0.0)
        if FUSE_QUANT:
            # x arrives in bf16/fp16: quantize this [BLOCK_K, BLOCK_M] tile here, exactly as
            # quant_fp8_act would (per token per 128-block), saving a launch and a round trip.
            xf = xt.to(tl.float32)
            a_s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(xf), axis=0), 1e-12), FMAX)
            xt = to_fp8e4(tl.math.div_rn(xf, a_s[None, :]), INTERPRET)
        else:
            a_s = tl.load(xs_ptr + kb * stride_xs + rm)
        if SCALAR_WS:
            # The tile lies inside one 128-row weight block: fold its scale into the activation
            # scales (BLOCK_M multiplies) so the epilogue of each K block is one FMA per element.
            w_s1 = tl.load(ws_ptr + ((pid_n * BLOCK_N) // BLOCK_K) * stride_wsn + kb)
            acc += mma(w, xt, INTERPRET) * (a_s * w_s1)[None, :]
        else:
            w_s = tl.load(ws_ptrs + kb)
            acc += mma(w, xt, INTERPRET) * w_s[:, None] * a_s[None, :]

    out_ptrs = out_ptr + pid_k * stride_osplit + offs_m[None, :] * stride_om + offs_n[:, None]
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    tl.store(out_ptrs, cast_out(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@dataclass(frozen=True)
class Fp8Config:
    block_m: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 0  # 0: choose from the grid size
    fuse_quant: bool = False  # quantize x inside the GEMM (worth it for small M: x is re-read per N tile)
    gemv: bool = False  # M = 1 only: CUDA-core GEMV with fused quantization (gemv.py)
    nb: int = 0  # with gemv: the TMA-fed GEMV, nb K blocks per step, num_stages deep ring (x quantized first)
    cublas: bool = False  # large M: our one-pass activation quant, then cuBLAS's block-scaled fp8 GEMM (SM90)


def _candidates(m: int, interpret: bool) -> list[Fp8Config]:
    if interpret:
        return [Fp8Config(16, 32, 4, 1, fuse_quant=True)]
    if m <= 16:
        fused = [Fp8Config(16, bn, 4, 3, sk, True) for bn in (32, 64, 128) for sk in (0, 1)]
        gemv = [Fp8Config(1, 16, 4, 3, gemv=True)]
        # (rows, warps, stages, K blocks per step), from a 22-config sweep run twice on the H100 (2026-12-07,
        # BENCH_H100.md): (4, 2, 3, 4) was fastest or within 0.6 us of it on every DeepSeek shape, (2, 2, 4, 8)
        # won on 2048 x 7168 and tied on 18432 x 7168 (49.2 / 49.3 us). Several configs there run at either
        # ~49 or ~56 us from one timing to the next ((4, 2, 4, 4), the earlier pick: 50.1 then 57.7; (4, 2, 3, 4)
        # 49.2 in one process, 56.5 in another where (2, 2, 4, 8) gave 49.4), so the tuner keeps both.
        wide = [Fp8Config(1, bn, w, st, gemv=True, nb=nb) for bn, w, st, nb in ((4, 2, 3, 4), (2, 2, 4, 8))]
        return (wide + gemv if m == 1 else []) + fused + [Fp8Config(16, 64, 4, 3)]
    if m <= 64:
        return [Fp8Config(bm, bn, 4, 3, 0, fq) for bm in (32, 64) for bn in (64, 128) for fq in (False, True)]
    if m <= 256:
        return [Fp8Config(bm, 128, w, 4, sk) for bm in (64, 128) for w in (4, 8) for sk in (0, 1)]
    return [  # (block_m, block_n): block_m is the wgmma N side (swap-AB), block_n <= 128 keeps SCALAR_WS
        Fp8Config(128, 128, 8, 4),
        Fp8Config(128, 128, 8, 3),
        Fp8Config(64, 128, 4, 4),
        Fp8Config(cublas=True),
    ]


def launch_fp8_block(
    x: torch.Tensor,
    w: torch.Tensor,
    scale_inv: torch.Tensor,
    cfg: Fp8Config,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Activation quantization (separate or fused) + GEMM for a 2-D x, with one config.

    Exposed so tests can force every code path.
    """
    m, k = x.shape
    n = w.shape[0]
    if cfg.gemv and m != 1:
        cfg = Fp8Config(fuse_quant=True)  # the GEMV handles one row only
    if cfg.gemv and cfg.nb and k % FP8_BLOCK == 0 and tma_compatible(w):
        return _launch_wide_gemv(x, w, scale_inv, cfg, out)
    if cfg.cublas:
        if not cublas_block_fp8_ok(x, w):
            cfg = Fp8Config(128, 128, 8, 4)  # unsupported here: the Triton GEMM
        else:
            y = _cublas_block_fp8(x, w, scale_inv)
            return y if out is None else out.copy_(y)
    if cfg.fuse_quant or cfg.gemv:
        xq, xs = x, x  # xs unused
    else:
        xq, xs = quant_fp8_act(x)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    k_blocks = triton.cdiv(k, FP8_BLOCK)
    split = cfg.split_k or _splitk.auto_split(tiles, k_blocks, num_sms(x.device))
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    target, split_stride = _splitk.target(out, split)
    if cfg.gemv:
        fp8_gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
            x, w, scale_inv, target, n, k, split, w.stride(0), scale_inv.stride(0), split_stride,
            EVEN_K=k % FP8_BLOCK == 0, INTERPRET=not x.is_cuda, FMAX=FP8_MAX,
            BLOCK_N=cfg.block_n, BLOCK_K=FP8_BLOCK, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return _splitk.finish(out, target, split)
    _fp8_block_gemm_kernel[(tiles, split)](
        xq, xs, w, scale_inv, target,
        m, n, k, split,
        xq.stride(0), xs.stride(0), w.stride(0), scale_inv.stride(0), target.stride(-2), split_stride,
        EVEN_K=k % FP8_BLOCK == 0, GROUP_M=8, INTERPRET=not x.is_cuda, FUSE_QUANT=cfg.fuse_quant, FMAX=FP8_MAX,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=FP8_BLOCK, SCALAR_WS=FP8_BLOCK % cfg.block_n == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _splitk.finish(out, target, split)


_CUBLAS_OK: dict[int, bool] = {}


def _cublas_block_fp8(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x quantized by :func:`quant_fp8_act`, then ``F.scaled_mm`` with DeepSeek's 1x128 / 128x128 scales.

    cuBLAS (CUDA >= 12.9, SM90) applies per-K-block scales inside its own warp-specialized fp8 GEMM, which a
    Triton kernel cannot match at large M (it has to wait on each 128-deep MMA before scaling it). The math
    is the same as the reference: fp8 x fp8 products, fp32 accumulation, both scales per K block. cuBLAS
    wants the activation scales token-major ([M, K/128] with stride 1 along M, which is what
    quant_fp8_act's K-block-major [K/128, M] is, transposed) and M a multiple of 4.
    """
    import torch.nn.functional as F

    m = x.shape[0]
    xp = F.pad(x, (0, 0, 0, -m % 4)) if m % 4 else x
    xq, xs = quant_fp8_act(xp)
    y = F.scaled_mm(xq, w.t(), xs.t(), F.ScalingType.BlockWise1x128, scale_inv.t(),
                    F.ScalingType.BlockWise128x128, output_dtype=x.dtype)
    return y[:m] if m % 4 else y


def cublas_block_fp8_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the cuBLAS path applies here and gives the reference's numbers (checked once per device).

    Needs a CUDA SM90 device, torch's ``F.scaled_mm`` with block scaling, bf16/fp16 x, and N, K multiples
    of 128 with K / 128 a multiple of 4 (cuBLAS's padding rule for the weight scales).
    """
    import torch.nn.functional as F

    n, k = w.shape
    if not (x.is_cuda and hasattr(F, "scaled_mm") and hasattr(F, "ScalingType") and x.dtype != torch.float32
            and n % 128 == 0 and k % 512 == 0):
        return False
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if dev not in _CUBLAS_OK:
        ok = torch.cuda.get_device_capability(dev) == (9, 0)
        if ok:
            try:
                g = torch.Generator(device=x.device).manual_seed(0)
                xa = torch.randn(6, 512, device=x.device, generator=g).to(torch.bfloat16)
                wa = torch.randn(256, 512, device=x.device, generator=g).to(torch.float8_e4m3fn)
                sa = 0.5 + torch.rand(2, 4, device=x.device, generator=g)
                ref = linear_fp8_block_ref(xa, wa, sa).float()
                err = (_cublas_block_fp8(xa, wa, sa).float() - ref).norm() / ref.norm()
                ok = bool(err < 1e-2)
            except Exception:  # noqa: BLE001 - any refusal (old cuBLAS, other layout rules) means "not here"
                ok = False
        _CUBLAS_OK[dev] = ok
    return _CUBLAS_OK[dev]


def _launch_wide_gemv(
    x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, cfg: Fp8Config, out: torch.Tensor | None
) -> torch.Tensor:
    """M = 1 through :func:`.gemv.fp8_gemv_tma_kernel`, x quantized by one tiny pass first (K % 128 == 0)."""
    k = x.shape[1]
    n = w.shape[0]
    if out is None:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    pdl = x.is_cuda  # programmatic dependent launches (sm_90, as is the TMA this kernel needs)
    xq, xs = quant_fp8_act(x, pdl)
    tiles = triton.cdiv(n, cfg.block_n)
    split, per = _splitk.gemv_split(tiles, triton.cdiv(k, cfg.nb * FP8_BLOCK), num_sms(x.device), cfg.split_k)
    target, split_stride = _splitk.target(out, split)
    desc = row_blocks_descriptor(w, FP8_BLOCK, (cfg.block_n, cfg.nb))
    fp8_gemv_tma_kernel[(tiles, split)](
        xq, xs, desc, scale_inv, target, n, k, per, scale_inv.stride(0), split_stride,
        INTERPRET=not x.is_cuda, PDL=pdl, BLOCK_N=cfg.block_n, NB=cfg.nb, STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl,
    )
    return _splitk.finish(out, target, split, pdl)


def linear_fp8_block(
    x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, backend: Backend = "auto"
) -> torch.Tensor:
    """y = x @ dequant(W).T for DeepSeek-V3 block-FP8 weights; x [..., K] bf16/fp16/fp32."""
    check_fp8_block_args(x, weight, scale_inv)
    n = weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if not use_triton(backend, x, weight):
        return linear_fp8_block_ref(x2, weight, scale_inv).reshape(*x.shape[:-1], n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    bucket = 1 << max(0, (m - 1).bit_length())
    key = ("fp8", x.dtype, bucket, n, k)
    run = lambda c: launch_fp8_block(x2, weight, scale_inv, c)  # noqa: E731
    cold = lambda: [  # noqa: E731
        lambda c, o=o: launch_fp8_block(x2, o[0], o[1], c) for o in _tuning.cold_copies(weight, scale_inv)
    ]
    cfg = _tuning.pick(key, lambda: _candidates(m, not x.is_cuda), run, x.is_cuda, cold=cold)
    if _graphs.applicable(x2):  # decode: host-bound eagerly (see _graphs)
        call = lambda x2: launch_fp8_block(x2, weight, scale_inv, cfg)  # noqa: E731
        return _graphs.run((key, cfg), call, (x2,), (weight, scale_inv)).reshape(*x.shape[:-1], n)
    return launch_fp8_block(x2, weight, scale_inv, cfg).reshape(*x.shape[:-1], n)
