"""Tokenizers: load a checkpoint's `tokenizer.json`, or train a byte-level BPE for the toy model.

We use the `tokenizers` library directly (fast, no transformers import on the hot path); the files
we write are the standard `tokenizer.json` + `tokenizer_config.json`, so transformers' AutoTokenizer
and lm-eval load them too.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from squeeze.errors import CheckpointError

BOS = "<｜begin▁of▁sentence｜>"  # DeepSeek's special tokens, so prompts built for the real model fit
EOS = "<｜end▁of▁sentence｜>"


def train_bpe(text: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, directory: Path, max_length: int) -> None:
    tok.save(str(directory / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_tokenizer(checkpoint: str | Path) -> Tokenizer:
    path = Path(checkpoint) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"no tokenizer.json in {checkpoint}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
        raise CheckpointError(f"cannot read {path}: {e}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
