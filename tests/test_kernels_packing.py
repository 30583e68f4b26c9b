"""The int4 layout the kernels read is exactly compressed-tensors' pack-quantized layout."""

from __future__ import annotations

import pytest
import torch

from squeeze.kernels import pack_int4, unpack_int4

helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


@pytest.mark.parametrize("shape", [(1, 8), (5, 64), (33, 200)])
def test_pack_matches_compressed_tensors(shape: tuple[int, int]) -> None:
    q = torch.randint(-8, 8, shape, generator=torch.Generator().manual_seed(shape[1]), dtype=torch.int8)
    ours = pack_int4(q)
    theirs = helpers.pack_to_int32(q, 4)
    assert ours.dtype == torch.int32 and ours.shape == (shape[0], shape[1] // 8)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int4(theirs), q)
    assert torch.equal(helpers.unpack_from_int32(ours, 4, torch.Size(shape)), q)


def test_layout_is_word_k_div_8_bits_4_k_mod_8() -> None:
    q = torch.full((1, 16), -8, dtype=torch.int8)
    q[0, 11] = 7  # k=11 -> word 1, bits 12..15, stored as 7 + 8 = 15
    assert pack_int4(q).tolist() == [[0, 0xF << 12]]


def test_3d_expert_stacks() -> None:
    q = torch.randint(-8, 8, (3, 4, 32), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    assert torch.equal(pack_int4(q), helpers.pack_to_int32(q, 4))
