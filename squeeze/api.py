"""Library entry points. The CLI and the tests call these; they raise `SqueezeError` on bad input."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from squeeze.checkpoint.reader import CheckpointReader
from squeeze.data import load_text, token_windows
from squeeze.errors import SqueezeError
from squeeze.inspect import CheckpointSummary, summarize
from squeeze.model.runtime import LayerwiseModel
from squeeze.model.tokenizer import load_tokenizer
from squeeze.model.toy import ToySpec, TrainResult, make_toy

__all__ = ["PerplexityResult", "ToySpec", "TrainResult", "generate", "inspect", "make_toy", "perplexity"]


def inspect(checkpoint: str | Path) -> CheckpointSummary:
    return summarize(CheckpointReader(checkpoint))


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int
    windows: int
    seconds: float


def perplexity(checkpoint: str | Path, text: str | Path = "corpus:heldout", seq_len: int = 128,
               max_windows: int | None = None, batch_size: int = 8, dtype: torch.dtype = torch.float32,
               device: str = "cpu", on_layer: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity over consecutive non-overlapping windows of `text`, run layer by layer from disk."""
    if seq_len < 2:
        raise SqueezeError("--seq-len must be at least 2")
    model = LayerwiseModel(checkpoint, dtype=dtype, device=device)
    tok = load_tokenizer(checkpoint)
    windows = token_windows(tok.encode(load_text(text)).ids, seq_len, max_windows)
    start = time.perf_counter()
    hook = (lambda i, _layer: on_layer(i, model.num_layers)) if on_layer else None
    total, count = model.nll(windows, batch_size, hook)
    return PerplexityResult(math.exp(total / count), count, windows.shape[0], time.perf_counter() - start)


def generate(checkpoint: str | Path, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, device: str = "cpu") -> Iterator[str]:
    """Stream decoded text pieces for `prompt`; layers stay resident when the model is small."""
    reader = CheckpointReader(checkpoint)
    small = reader.file_size() < 2 * 1024**3
    model = LayerwiseModel(reader, device=device, keep_layers=small)
    tok = load_tokenizer(checkpoint)
    ids = tok.encode(prompt).ids
    if not ids:
        raise SqueezeError("the prompt is empty after tokenization")
    eos = reader.config.raw.get("eos_token_id")
    new: list[int] = []
    shown = ""
    for t in model.generate(torch.tensor([ids]), max_new_tokens, temperature, top_k, eos, seed):
        new.append(t)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            yield text[len(shown):]
            shown = text
