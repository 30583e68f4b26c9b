"""Recovery-table arithmetic and its files, on fixed inputs (no model runs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from squeeze.errors import SqueezeError
from squeeze.evaluation.recovery import (
    ModelResult,
    RecoveryTable,
    TaskScore,
    average_score,
    recovery,
    scores_from_lm_eval,
)
from squeeze.evaluation.runner import write_outputs


def _model(name: str, acc_a: float, acc_b: float, ppl: float, size: int) -> ModelResult:
    return ModelResult(name, f"/m/{name}", {
        "a": TaskScore("a", "acc", acc_a, 0.01, True, 0),
        "b": TaskScore("b", "acc_norm", acc_b, 0.02, True, 5),
        "ppl": TaskScore("ppl", "word_perplexity", ppl, None, False, 0),
    }, size)


BASE = _model("BF16", 0.80, 0.50, 20.0, 1000)
VAR = _model("W4A16", 0.72, 0.50, 25.0, 250)


def test_recovery_is_the_mean_of_per_task_ratios() -> None:
    # a: 0.72/0.80 = 0.9; b: 1.0; ppl (lower is better): 20/25 = 0.8  -> mean 0.9
    assert recovery(BASE, VAR) == pytest.approx(90.0)
    assert recovery(BASE, BASE) == pytest.approx(100.0)
    assert average_score(VAR) == pytest.approx((72 + 50) / 2)  # perplexity stays out of the average


def test_table_rows_markdown_and_csv() -> None:
    table = RecoveryTable([BASE, VAR])
    head = table.header()
    assert head[:3] == ["Model", "Recovery %", "Average Score"]
    assert head[3:6] == ["a (0-shot)", "b (5-shot)", "ppl (0-shot, ppl)"]
    rows = table.rows()
    assert rows[0][:6] == ["BF16", "100.00%", "65.00", "80.00", "50.00", "20.00"]
    assert rows[1][:6] == ["W4A16", "90.00%", "61.00", "72.00", "50.00", "25.00"]
    assert rows[1][-2] == "4.00x"
    md = table.to_markdown()
    assert md.splitlines()[2].startswith("| BF16 | 100.00% |") and "Recovery % = mean over tasks" in md
    parsed = list(csv.reader(table.to_csv().splitlines()))
    assert parsed[0] == head and parsed[2][1] == "90.00%"


def test_scores_from_lm_eval_picks_the_primary_metric_and_stderr() -> None:
    results = {
        "results": {
            "mc": {"alias": "mc", "acc,none": 0.6, "acc_stderr,none": 0.05, "acc_norm,none": 0.7,
                   "acc_norm_stderr,none": 0.04},
            "lm": {"alias": "lm", "word_perplexity,none": 33.0, "word_perplexity_stderr,none": "N/A",
                   "bits_per_byte,none": 1.2},
        },
        "higher_is_better": {"mc": {"acc": True, "acc_norm": True},
                             "lm": {"word_perplexity": False, "bits_per_byte": False}},
        "n-shot": {"mc": 5, "lm": 0},
    }
    s = scores_from_lm_eval(results)
    assert (s["mc"].metric, s["mc"].value, s["mc"].stderr, s["mc"].n_shot) == ("acc", 0.6, 0.05, 5)
    assert (s["lm"].metric, s["lm"].value, s["lm"].stderr, s["lm"].higher_is_better) == \
        ("word_perplexity", 33.0, None, False)


def test_outputs_written_whole_with_stderr_in_json(tmp_path: Path) -> None:
    out = tmp_path / "report"
    write_outputs(RecoveryTable([BASE, VAR]), out)
    assert sorted(p.name for p in out.iterdir()) == ["recovery.csv", "recovery.json", "recovery.md", "recovery.png"]
    assert (out / "recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "recovery.json").read_text())
    assert data["models"][1]["recovery_pct"] == pytest.approx(90.0)
    assert data["models"][1]["scores"]["a"]["stderr"] == 0.01
    assert data["models"][1]["compression_ratio"] == 4.0
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temp dir left behind


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: RecoveryTable, path: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(RecoveryTable, "plot", boom)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(RecoveryTable([BASE, VAR]), tmp_path / "report")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "keep").mkdir()
    with pytest.raises(SqueezeError, match="exists"):
        write_outputs(RecoveryTable([BASE, VAR]), tmp_path / "keep", overwrite=False)
