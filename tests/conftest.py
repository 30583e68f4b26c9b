"""Shared fixtures: small toy checkpoints built on the fly (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton decides when a kernel is defined whether it is compiled for the GPU or run by its CPU
# interpreter, so the choice is made here, before any test module imports squeeze.kernels: without a
# GPU every kernel test runs in-process under the interpreter (CI), with one they run compiled.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from squeeze.model.toy import ToySpec, write_random_toy  # noqa: E402

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


# A trained toy shared by the tests that need a real language model (quantization, distillation,
# evaluation): every K dimension is a multiple of 128 so all group sizes apply. ~1 minute to build.
TRAINED = ToySpec(layers=3, dense_layers=1, hidden=128, heads=4, experts=8, top_k=2, n_group=4, topk_group=2,
                  moe_inter=128, inter=256, vocab=2048, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
                  qk_rope_head_dim=32, v_head_dim=32)
TRAINED_STEPS = 300


@pytest.fixture(scope="session")
def trained_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a trained toy MoE checkpoint (bf16). Treat as read-only."""
    from squeeze.model.toy import make_toy

    out = tmp_path_factory.mktemp("trained") / "toy"
    make_toy(out, TRAINED, train_steps=TRAINED_STEPS, max_shard_bytes=1024**2)
    return out
