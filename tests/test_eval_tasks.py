"""The bundled offline tasks: data regenerates byte for byte, lm-eval finds them, chance levels are stated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from squeeze.evaluation import make_tasks
from squeeze.evaluation.runner import DEFAULT_TASKS, TASKS_DIR

pytest.importorskip("lm_eval")


def test_task_data_regenerates_identically(tmp_path: Path) -> None:
    counts = make_tasks.build(tmp_path)
    assert counts and all(n >= 100 for n in counts.values())
    for name in counts:
        assert (tmp_path / name).read_bytes() == (TASKS_DIR / name).read_bytes(), name


def test_multiple_choice_docs_are_well_formed() -> None:
    for name, n_choices in (("cloze.jsonl", 4), ("sentence_order.jsonl", 2), ("word_choice.jsonl", 4)):
        docs = [json.loads(line) for line in (TASKS_DIR / name).read_text().splitlines()]
        labels = [d["label"] for d in docs]
        for d in docs:
            assert len(d["choices"]) == n_choices == len(set(d["choices"]))
            assert d["context"].strip()
        # Answers are spread over the positions, so a position bias cannot score above chance.
        assert max(labels.count(i) for i in range(n_choices)) / len(docs) < 1.6 / n_choices


def _yaml_load(path: Path) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 - SafeLoader subclass


def test_every_bundled_task_is_found_and_states_its_chance_level() -> None:
    from squeeze.evaluation.runner import task_manager

    manager = task_manager()
    for task in DEFAULT_TASKS:
        assert task in manager.all_tasks
        cfg = _yaml_load(TASKS_DIR / f"{task}.yaml")
        if cfg["output_type"] == "multiple_choice":
            assert 0 < cfg["metadata"]["chance"] < 1
            assert f"Chance {cfg['metadata']['chance']:.0%}" in (TASKS_DIR / f"{task}.yaml").read_text()
        assert (TASKS_DIR / cfg["dataset_kwargs"]["file"]).is_file()
