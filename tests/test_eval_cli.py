"""`squeeze eval` end to end: the table for base + variants, the suite, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from squeeze.cli import app
from squeeze.data import corpus_text
from squeeze.evaluation.suite import VARIANTS, build_variants
from squeeze.model.tokenizer import save_tokenizer, train_bpe

pytest.importorskip("lm_eval")
runner = CliRunner()


@pytest.fixture
def small_pair(small_ckpt: Path, small_spec, tmp_path: Path) -> tuple[Path, Path]:  # noqa: ANN001
    save_tokenizer(train_bpe(corpus_text("heldout")[:40_000], small_spec.vocab), small_ckpt, 256)
    copy = tmp_path / "copy"
    shutil.copytree(small_ckpt, copy)
    return small_ckpt, copy


def test_eval_writes_the_table_for_base_and_variant(small_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, copy = small_pair
    out = tmp_path / "report"
    res = runner.invoke(app, ["eval", str(base), str(copy), "--tasks", "squeeze_cloze,squeeze_heldout_ppl",
                              "--limit", "4", "--out", str(out), "--names", "BF16,same"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "recovery.json").read_text())
    assert [m["name"] for m in data["models"]] == ["BF16", "same"]
    # An identical copy scores identically: 100% recovery, same per-task numbers.
    assert data["models"][1]["recovery_pct"] == pytest.approx(100.0)
    a, b = (m["scores"] for m in data["models"])
    assert a == b and set(a) == {"squeeze_cloze", "squeeze_heldout_ppl"}
    assert a["squeeze_cloze"]["stderr"] is not None
    md = (out / "recovery.md").read_text()
    assert "| BF16 | 100.00% |" in md and "| same | 100.00% |" in md


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "no_such_task"], "unknown lm-eval task 'no_such_task'"),
    (["--backend", "vllm"], "unknown backend 'vllm'"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--names", "a,b,c"], "--names gives 3 labels for 2 models"),
    (["--suite", "nope", "--out", "x"], "unknown suite 'nope'"),
])
def test_bad_input_is_one_line(small_pair: tuple[Path, Path], args: list[str], message: str) -> None:
    base, copy = small_pair
    res = runner.invoke(app, ["eval", str(base), str(copy), *args])
    assert res.exit_code == 1
    assert message in res.output and "Traceback" not in res.output


def test_checkpoint_without_tokenizer_is_refused(small_ckpt: Path) -> None:
    res = runner.invoke(app, ["eval", str(small_ckpt)])
    assert res.exit_code == 1 and "no tokenizer.json" in res.output


def test_uncached_standard_task_says_so(small_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-hf-cache" / "datasets"))
    res = runner.invoke(app, ["eval", str(small_pair[0]), "--tasks", "arc_easy", "--limit", "2"])
    assert res.exit_code == 1
    assert "task 'arc_easy': its data is not in the local Hugging Face cache" in res.output


def test_suite_skips_unavailable_methods_and_reuses_finished_variants(tmp_path: Path) -> None:
    made_by: list[str] = []
    notes: list[str] = []

    def fake_quantize(base: Path, out: Path, variant) -> None:  # noqa: ANN001
        made_by.append(variant.name)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    methods = {VARIANTS[0].method, VARIANTS[2].method}
    made = build_variants(tmp_path / "base", tmp_path / "work", quantize=fake_quantize, methods=methods,
                          note=notes.append)
    assert [n for n, _ in made] == [VARIANTS[0].name, VARIANTS[2].name] == made_by
    assert sum("not available in this build yet" in n for n in notes) == 2
    again = build_variants(tmp_path / "base", tmp_path / "work", quantize=fake_quantize, methods=methods,
                           note=notes.append)
    assert again == made and made_by == [VARIANTS[0].name, VARIANTS[2].name]  # nothing re-quantized


@pytest.mark.slow
def test_compression_suite_on_the_trained_toy(trained_toy: Path, tmp_path: Path) -> None:
    """The whole study in one command with the quantization methods this build has."""
    out = tmp_path / "report"
    res = runner.invoke(app, ["eval", str(trained_toy), "--suite", "compression", "--limit", "40", "--out", str(out),
                              "--tasks", "squeeze_cloze,squeeze_word_choice,squeeze_heldout_ppl"])
    assert res.exit_code == 0, res.output
    models = json.loads((out / "recovery.json").read_text())["models"]
    assert models[0]["recovery_pct"] == pytest.approx(100.0)
    names = [m["name"] for m in models]
    assert "W8A8-FP8-block" in names  # FP8 block storage exists in every build
    for m in models[1:]:
        assert m["compression_ratio"] > 1.2
        assert 80 < m["recovery_pct"] < 110
    # The trained toy scores well above the stated chance level (25%) on the cloze tasks.
    base = models[0]["scores"]
    assert base["squeeze_cloze"]["value"] > 0.45
    assert base["squeeze_word_choice"]["value"] > 0.40
    assert (out.parent / "report-variants" / "W8A8-FP8-block" / "tokenizer.json").is_file()
