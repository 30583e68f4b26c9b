"""Text for training, calibration and evaluation: the bundled corpus, local files, or HF datasets.

Everything runs offline: the bundled corpus (`corpus:train`, `corpus:calibration`, `corpus:heldout`)
ships inside the package. A path reads a local text file; any other name is tried as a Hugging Face
dataset, which works when it is in the local cache (real users are online) and otherwise fails with
one line saying so.
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import torch

from squeeze.errors import SqueezeError

CORPUS_SPLITS = ("train", "calibration", "heldout")


def corpus_text(split: str) -> str:
    """One split of the bundled corpus (King James Bible; see squeeze/corpus/SOURCE.md)."""
    if split not in CORPUS_SPLITS:
        raise SqueezeError(f"unknown corpus split '{split}' (one of {', '.join(CORPUS_SPLITS)})")
    blob = resources.files("squeeze").joinpath("corpus", f"kjv-{split}.txt.gz").read_bytes()
    return gzip.decompress(blob).decode("utf-8")


def load_text(source: str | Path, split: str = "train", text_field: str = "text") -> str:
    """Text from `corpus:SPLIT`, a local file, or a cached Hugging Face dataset name."""
    s = str(source)
    if s.startswith("corpus:"):
        return corpus_text(s.split(":", 1)[1])
    p = Path(s)
    if p.exists():
        if p.is_dir():
            raise SqueezeError(f"{p} is a directory; pass a text file")
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SqueezeError(f"{p} is not UTF-8 text") from None
    if "/" not in s and not s.replace("-", "").replace("_", "").isalnum():
        raise SqueezeError(f"text file not found: {p}")
    return _hf_dataset_text(s, split, text_field)


def _hf_dataset_text(name: str, split: str, text_field: str) -> str:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
        raise SqueezeError(
            f"dataset '{name}' is neither a local file nor loadable from the Hugging Face cache "
            f"({type(e).__name__}); pass a text file or corpus:train|calibration|heldout"
        ) from None
    if text_field not in ds.column_names:
        raise SqueezeError(f"dataset '{name}' has no '{text_field}' column (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(ds[text_field])


def token_windows(ids: list[int] | torch.Tensor, seq_len: int, num: int | None = None,
                  seed: int | None = None) -> torch.Tensor:
    """Cut a token stream into [W, seq_len] windows.

    Without a seed, windows are consecutive and non-overlapping (perplexity: every token counted
    once). With a seed, `num` windows start at random offsets (calibration and training samples).
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise SqueezeError(f"text too short: {ids.numel()} tokens for windows of {seq_len}")
    if seed is None:
        n = ids.numel() // seq_len
        w = ids[: n * seq_len].view(n, seq_len)
        return w[:num] if num else w
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num or 1,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
