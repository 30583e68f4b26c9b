"""Block-FP8 storage: dequantization equals DeepSeek's formula, edge blocks included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from squeeze.checkpoint import CheckpointReader, dequantize_fp8_block, quantize_fp8_block
from squeeze.checkpoint.fp8 import FP8_DTYPE
from squeeze.model.toy import write_random_toy
from tests.conftest import SMALL


def reference_dequant(w: torch.Tensor, s: torch.Tensor, bs: int = 128) -> torch.Tensor:
    """The formula written out block by block, as DeepSeek's inference/kernel.py computes it."""
    out = torch.empty(w.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].float()
            out[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = blk * s[i, j]
    return out


@pytest.mark.parametrize("shape", [(256, 384), (160, 256), (300, 129), (1, 7), (128, 128)])
def test_dequantize_matches_reference_formula(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    w = (torch.randn(shape, generator=gen) * 3).to(FP8_DTYPE)
    s = torch.rand((-(-shape[0] // 128), -(-shape[1] // 128)), generator=gen) + 0.01
    assert torch.equal(dequantize_fp8_block(w, s), reference_dequant(w, s))


@pytest.mark.parametrize("shape", [(256, 384), (200, 130)])
def test_quantize_round_trip_error_is_fp8_rounding(shape: tuple[int, int]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q, s = quantize_fp8_block(w)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    back = dequantize_fp8_block(q, s)
    rel = float((back - w).norm() / w.norm())
    assert 1e-3 < rel < 0.04  # e4m3 has a 3-bit mantissa: about 2-3% relative error
    # Each block's largest magnitude maps onto e4m3's largest finite value.
    assert float(q.float().abs().max()) == 448.0


def test_dequantize_rejects_wrong_scale_grid() -> None:
    w = torch.randn(130, 130).to(FP8_DTYPE)
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        dequantize_fp8_block(w, torch.ones(1, 1))


def test_reader_dequantizes_fp8_checkpoint_per_tensor(tmp_path: Path) -> None:
    write_random_toy(tmp_path / "m", SMALL, fp8=True)
    r = CheckpointReader(tmp_path / "m")
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # 40 x 64: one partial block
    raw = r.read_raw([name, name + "_scale_inv"])
    assert raw[name].dtype == FP8_DTYPE
    assert r.storage_format(name) == "fp8-block"
    assert torch.equal(r.read_one(name), reference_dequant(raw[name], raw[name + "_scale_inv"]))
    # Norms, router and embeddings are not FP8, as in DeepSeek's release.
    assert r.storage_format("model.layers.1.mlp.gate.weight") == "fp32"
    assert r.storage_format("model.embed_tokens.weight") == "bf16"
    assert name + "_scale_inv" not in r.names
