"""DeepSeek's block-FP8 storage: float8_e4m3fn weights with one fp32 `weight_scale_inv` per block.

The real checkpoints store `W ≈ W_fp8 * scale_inv[block]` with 128x128 blocks; edge blocks of weights
whose shape is not a multiple of 128 are partial and still get one scale. These two functions are the
only place that formula lives: the reader dequantizes with it, the writer quantizes with it.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
DEFAULT_BLOCK = (128, 128)


def _expand_scales(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """Broadcast a [ceil(N/bn), ceil(K/bk)] scale grid to the weight's [N, K] shape."""
    n, k = shape
    return scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]


def dequantize_fp8_block(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return `weight * scale_inv` per block, computed in fp32 and cast to `dtype`."""
    if weight.dim() != 2:
        raise ValueError(f"block-FP8 weights are 2-D, got shape {tuple(weight.shape)}")
    expected = (-(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a weight of shape "
            f"{tuple(weight.shape)} with {block[0]}x{block[1]} blocks"
        )
    w = weight.to(torch.float32) * _expand_scales(scale_inv.to(torch.float32), weight.shape, block)
    return w.to(dtype)


def quantize_fp8_block(
    weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to (float8_e4m3fn weight, fp32 scale_inv) with one scale per block.

    The scale maps each block's absolute maximum to the largest finite e4m3 value, as DeepSeek's own
    conversion does; an all-zero block gets scale 1 so that dequantization stays exact.
    """
    if weight.dim() != 2:
        raise ValueError(f"block-FP8 weights are 2-D, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    w = weight.to(torch.float32)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32)
    padded[:n, :k] = w
    blocks = padded.view(nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand_scales(scale_inv, weight.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale_inv
