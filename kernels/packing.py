"""int4 packing in compressed-tensors' "pack-quantized" layout (the layout the kernels read).

``weight_packed`` is int32 [N, K // 8]: value k of row n sits in word k // 8 at bits 4 * (k % 8),
stored unsigned as q + 8 for signed q in [-8, 7]. This is bit-for-bit what
``compressed_tensors``' ``pack_to_int32(q, num_bits=4)`` writes, so checkpoints load with no repacking.
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.int32) * 4


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values ``q`` (any int dtype, [..., K], K % 8 == 0) into int32 [..., K // 8]."""
    if q.shape[-1] % 8:
        raise ValueError(f"last dim {q.shape[-1]} must be a multiple of 8")
    u = (q.to(torch.int32) + 8).reshape(*q.shape[:-1], q.shape[-1] // 8, 8)
    return _pack_words(u)


def _pack_words(u: torch.Tensor) -> torch.Tensor:
    """OR eight 4-bit fields into one int32 word.

    Summing disjoint bit fields equals OR-ing them; nibble 7 reaches the sign bit, so the sum is
    formed in int64 and wrapped to the two's-complement int32 bit pattern.
    """
    words = (u.to(torch.int64) << _SHIFTS.to(u.device).to(torch.int64)).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 [..., K // 8] -> int8 [..., K] in [-8, 7]."""
    u = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return (u - 8).to(torch.int8).reshape(*packed.shape[:-1], packed.shape[-1] * 8)
