"""Shared fixtures: small toy checkpoints built on the fly (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from squeeze.model.toy import ToySpec, write_random_toy

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SMALL = ToySpec(layers=3, dense_layers=1, hidden=64, heads=2, experts=8, top_k=2, n_group=4, topk_group=2,
                moe_inter=32, inter=96, vocab=512, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16)


@pytest.fixture
def small_spec() -> ToySpec:
    return SMALL


@pytest.fixture
def small_ckpt(tmp_path: Path) -> Path:
    out = tmp_path / "small"
    write_random_toy(out, SMALL, bias_std=0.05, max_shard_bytes=64 * 1024)
    return out
