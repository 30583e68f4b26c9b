"""Dataset loader for squeeze's bundled lm-eval tasks (referenced from the YAML via `!function`).

A `custom_dataset` callable rather than `dataset_path: json` because lm-eval resolves `data_files`
against the working directory, not the YAML's folder; this reads the JSONL next to this file, so the
tasks work from any directory and offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets


def load_jsonl(file: str, **_: object) -> datasets.DatasetDict:
    """The bundled JSONL `file` as a single `test` split (extra lm-eval metadata is ignored)."""
    path = Path(__file__).parent / file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
