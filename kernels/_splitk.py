"""Split-K bookkeeping shared by the GEMM launchers.

Small-M GEMMs have few output tiles; splitting K gives every SM a share of the weight stream.
Partial sums go to an fp32 workspace [split, M, N] (each element written exactly once, so the
tests can poison it) and are reduced by torch afterwards.
"""

from __future__ import annotations

import torch
import triton


def auto_split(tiles: int, k_blocks: int, sms: int, per_sm: int = 8) -> int:
    """K-splits so that about ``per_sm`` programs per SM stream weights, at least 4 K-blocks each.

    A decode-shaped GEMM is a chain of dependent load -> dequant -> MMA steps per program; with
    only 1-2 programs per SM that chain's latency, not bandwidth, sets the time (measured on an
    H100: 0.65 TB/s with ~2 programs per SM). Many short programs keep enough bytes in flight.
    """
    if tiles >= per_sm * sms:
        return 1
    return max(1, min(triton.cdiv(per_sm * sms, tiles), k_blocks // 4, 32))


def target(out: torch.Tensor, split: int) -> tuple[torch.Tensor, int]:
    """Where the kernel writes: ``out`` itself, or an fp32 workspace; plus its split stride."""
    if split == 1:
        return out, 0
    ws = torch.empty(split, *out.shape, dtype=torch.float32, device=out.device)
    return ws, ws.stride(0)


def finish(out: torch.Tensor, written: torch.Tensor, split: int) -> torch.Tensor:
    """Reduce the workspace into ``out`` (no-op when the kernel wrote ``out`` directly)."""
    if split > 1:
        out.copy_(written.sum(0))
    return out
