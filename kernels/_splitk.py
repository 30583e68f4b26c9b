"""Split-K bookkeeping shared by the GEMM launchers.

Small-M GEMMs have few output tiles; splitting K gives every SM a share of the weight stream.
Partial sums go to an fp32 workspace [split, M, N] (each element written exactly once, so the
tests can poison it) and are reduced afterwards by one small Triton kernel that also casts into
``out``: torch's ``out.copy_(ws.sum(0))`` is two launches (sum, then cast-copy), and at decode
sizes each launch costs about as much as the reduction itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from ._tl import cast_out


def auto_split(tiles: int, k_blocks: int, sms: int, per_sm: int = 8) -> int:
    """K-splits so that about ``per_sm`` programs per SM stream weights, at least 4 K-blocks each.

    A decode-shaped GEMM is a chain of dependent load -> dequant -> MMA steps per program; with
    only 1-2 programs per SM that chain's latency, not bandwidth, sets the time (measured on an
    H100: 0.65 TB/s with ~2 programs per SM). Many short programs keep enough bytes in flight.
    """
    if tiles >= per_sm * sms:
        return 1
    return max(1, min(triton.cdiv(per_sm * sms, tiles), k_blocks // 4, 32))


def gemv_split(tiles: int, steps: int, sms: int, forced: int = 0) -> tuple[int, int]:
    """(splits, steps per split) for the M = 1 GEMVs: split K only when N alone gives fewer than ~4
    programs per SM; splits are whole steps and never empty (``forced`` > 0: that many, at most)."""
    want = 4 * sms
    split = forced or (1 if tiles >= want else min(triton.cdiv(want, tiles), steps))
    per = triton.cdiv(steps, split)
    return triton.cdiv(steps, per), per


def target(out: torch.Tensor, split: int) -> tuple[torch.Tensor, int]:
    """Where the kernel writes: ``out`` itself, or an fp32 workspace; plus its split stride."""
    if split == 1:
        return out, 0
    ws = torch.empty(split, *out.shape, dtype=torch.float32, device=out.device)
    return ws, ws.stride(0)


def finish(out: torch.Tensor, written: torch.Tensor, split: int, pdl: bool = False) -> torch.Tensor:
    """Reduce the workspace into ``out`` (no-op when the kernel wrote ``out`` directly).

    ``pdl``: launch as a programmatic dependent of the kernel before (CUDA only), so its launch
    overlaps that kernel's tail; it waits for the partial sums on the device.
    """
    if split > 1:
        m, n = out.shape
        block = 1024
        pdl = pdl and out.is_cuda
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            written, out, split, m * n, n, out.stride(0), out.stride(1), INTERPRET=not out.is_cuda,
            PDL=pdl, BLOCK=block, num_warps=4, launch_pdl=pdl,
        )
    return out


@triton.jit
def _sum_splits_kernel(
    ws_ptr, out_ptr, SPLIT, numel, N, stride_om, stride_on, INTERPRET: tl.constexpr, PDL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[i] = sum over s of ws[s, i] (contiguous fp32 [SPLIT, M, N]) in fp32, cast to out's dtype."""
    if PDL:
        gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(ws_ptr + s * numel + offs, mask=mask, other=0.0)
    y = cast_out(acc, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + (offs // N) * stride_om + (offs % N) * stride_on, y, mask=mask)
