"""Training batches as a pure function of (seed, step, micro-batch), so a resumed run sees the same data."""

from __future__ import annotations

from pathlib import Path

import torch

from squeeze.data import load_text
from squeeze.errors import SqueezeError
from squeeze.model.tokenizer import load_tokenizer


def training_tokens(dataset: str, tokenizer_dir: str | Path) -> torch.Tensor:
    ids = load_tokenizer(tokenizer_dir).encode(load_text(dataset)).ids
    return torch.tensor(ids, dtype=torch.long)


def step_batch(tokens: torch.Tensor, step: int, micro: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """[B, seq_len + 1] windows at offsets drawn from a generator seeded by (seed, step, micro)."""
    if tokens.numel() < seq_len + 2:
        raise SqueezeError(f"training text too short: {tokens.numel()} tokens for windows of {seq_len}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro)
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
