"""Student construction, the distillation trainer, the teacher cache, resume, the CLI, transformers parity.

The teacher is a tiny random toy MoE with its own small BPE tokenizer (built in ~2 s): these tests check
mechanics and exact numbers, not learning quality, which `squeeze.distill.study` measures on the real toy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from squeeze import api
from squeeze.cli import app
from squeeze.data import corpus_text
from squeeze.distill.config import DistillConfig, make_config
from squeeze.distill.models import forward_with_states, load_causal_lm
from squeeze.distill.student import build_student, init_student, merged_ffn
from squeeze.distill.trainer import Distiller, run_distill, state_dir_for
from squeeze.errors import SqueezeError
from squeeze.model.moe import MoE
from squeeze.model.runtime import LayerwiseModel
from squeeze.model.tokenizer import TOKENIZER_FILES, save_tokenizer, train_bpe
from squeeze.model.toy import write_random_toy
from tests.conftest import SMALL

FAST: dict[str, object] = {"batch_size": 4, "seq_len": 32, "warmup_steps": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: on a shared 2-core CPU, intra-op threads cost more than they give."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "teacher"
    write_random_toy(out, SMALL, seed=0, bias_std=0.05)
    text = corpus_text("train")[:150_000]
    save_tokenizer(train_bpe(text, SMALL.vocab), out, 256)
    (out.parent / "train.txt").write_text(text[:40_000])  # tokenising the whole corpus per run is slow
    FAST["dataset"] = str(out.parent / "train.txt")
    return out


@pytest.fixture(scope="module")
def student(teacher: Path) -> Path:
    out = teacher.parent / "student"
    init_student(teacher, out, layers=2, hidden=32, ffn=48, init="random")
    return out


def test_student_is_dense_deepseek_and_shares_tokenizer(teacher: Path, student: Path) -> None:
    cfg = json.loads((student / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["first_k_dense_replace"] == cfg["num_hidden_layers"] == 2
    assert (cfg["hidden_size"], cfg["intermediate_size"]) == (32, 48)
    for f in TOKENIZER_FILES:
        assert (student / f).read_bytes() == (teacher / f).read_bytes()
    names = set(LayerwiseModel(student).reader.names)
    assert not any(".experts." in n or "mlp.gate." in n for n in names)
    assert "model.layers.1.mlp.down_proj.weight" in names


def test_student_logits_match_transformers(student: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, SMALL.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    ours = LayerwiseModel(student).logits(ids)
    assert float((ours - ref).norm() / ref.norm()) < 1e-4


def test_teacher_init_copies_attention_and_merges_experts(teacher: Path) -> None:
    t = load_causal_lm(teacher)
    s, lmap = build_student(teacher, layers=2, hidden=SMALL.hidden, ffn=SMALL.inter, init="teacher",
                            layer_map="0:0,1:2", usage_windows=4)
    assert lmap == {0: 0, 1: 2}
    assert torch.equal(s.model.embed_tokens.weight, t.model.embed_tokens.weight)
    assert torch.equal(s.lm_head.weight, t.lm_head.weight)
    assert torch.equal(s.model.layers[1].self_attn.kv_b_proj.weight, t.model.layers[2].self_attn.kv_b_proj.weight)
    x = torch.randn(5, SMALL.hidden)
    # layer 0 is dense in the teacher and as wide as the student: copied exactly (neurons may be reordered)
    assert torch.allclose(s.model.layers[0].mlp(x), t.model.layers[0].mlp(x), atol=1e-6)
    # a MoE merged at full width is the shared expert plus the usage-weighted routed experts
    moe = t.model.layers[2].mlp
    assert isinstance(moe, MoE)
    usage = torch.rand(len(moe.experts))
    width = SMALL.moe_inter * (1 + len(moe.experts))
    merged = merged_ffn(moe, width, usage)
    with torch.no_grad():
        dense = torch.nn.functional.silu(x @ merged["gate_proj.weight"].T) * (x @ merged["up_proj.weight"].T)
        got = dense @ merged["down_proj.weight"].T
        want = moe.shared_experts(x) + sum(u * e(x) for u, e in zip(usage, moe.experts, strict=True))
    assert torch.allclose(got, want, atol=1e-5)


def test_bad_student_requests_raise(teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(SqueezeError, match="--hidden"):
        init_student(teacher, tmp_path / "a", layers=2, hidden=32, ffn=48, init="teacher")
    with pytest.raises(SqueezeError, match="layer-map"):
        init_student(teacher, tmp_path / "b", layers=2, hidden=32, ffn=48, layer_map="0:7")
    with pytest.raises(SqueezeError, match="--loss"):
        make_config(loss="magic")
    with pytest.raises(SqueezeError, match="alpha"):
        make_config(loss="logit", alpha=1.0)


def test_losses_vanish_when_student_is_teacher(teacher: Path, tmp_path: Path) -> None:
    cfg = DistillConfig(loss="hybrid", **FAST).validate()
    run = Distiller(teacher, teacher, cfg, tmp_path)
    ids = torch.randint(0, SMALL.vocab, (2, 16))
    target = run.teacher_targets(ids, 0, 0)
    st = forward_with_states(run.student, ids, tuple(run.layer_map), True)
    parts = run.loss_parts(st, target, ids)
    for k in ("logit", "feature", "attention", "gram"):
        assert parts[k].item() == pytest.approx(0.0, abs=1e-5), k


def test_gradients_reach_student_and_projection_only(teacher: Path, student: Path, tmp_path: Path) -> None:
    cfg = DistillConfig(loss="hybrid", **FAST).validate()
    run = Distiller(teacher, student, cfg, tmp_path)
    logged = run.step(0)
    assert all(v > 0 for k, v in logged.items()), logged
    assert set(logged) == {"loss", "ce", "logit", "feature", "attention", "gram"}
    assert run.teacher is not None
    assert all(not p.requires_grad and p.grad is None for p in run.teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in run.projections.parameters())
    grads = [p.grad for p in run.student.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_kd_steps_lower_the_kd_loss(teacher: Path, student: Path, tmp_path: Path) -> None:
    cfg = make_config(loss="logit", alpha=0.0, temperature=1.0, steps=12, lr=3e-3, **FAST)
    r = run_distill(teacher, student, tmp_path / "out", cfg, eval_windows=0)
    first, last = r.history[0]["logit"], sum(h["logit"] for h in r.history[-3:]) / 3
    assert last < 0.8 * first
    text = FAST["dataset"]
    # the teacher is random (near-uniform), so is the student: a loadable, sane checkpoint scores about the vocab
    assert api.perplexity(tmp_path / "out", text, max_windows=4, seq_len=32).perplexity < 1.2 * SMALL.vocab
    assert not state_dir_for(tmp_path / "out").exists()


def test_resume_after_kill_continues_the_same_curve(teacher: Path, student: Path, tmp_path: Path) -> None:
    cfg = make_config(loss="hybrid", steps=6, checkpoint_every=2, **FAST)
    full = run_distill(teacher, student, tmp_path / "full", cfg, eval_windows=0).history

    def kill(step: int, _logged: dict[str, float]) -> None:
        if step == 4:  # dies after step 4; the last checkpoint holds steps 0..3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_distill(teacher, student, tmp_path / "cut", cfg, on_step=kill, eval_windows=0)
    assert not (tmp_path / "cut").exists()
    with pytest.raises(SqueezeError, match="--resume"):
        run_distill(teacher, student, tmp_path / "cut", cfg)
    resumed = run_distill(teacher, student, tmp_path / "cut", cfg, resume=True, eval_windows=0)
    assert resumed.start_step == 4
    for a, b in zip(full, resumed.history, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


def test_cached_teacher_gives_the_live_loss(teacher: Path, student: Path, tmp_path: Path) -> None:
    """With top-k = the whole vocabulary the cache is lossless up to fp16: same first-step losses."""
    live = make_config(loss="hybrid", steps=2, **FAST)
    cached = make_config(loss="hybrid", steps=2, cache_teacher=True, cache_top_k=SMALL.vocab, **FAST)
    a = run_distill(teacher, student, tmp_path / "live", live, eval_windows=0).history[0]
    b = run_distill(teacher, student, tmp_path / "cached", cached, keep_state=True,
                    eval_windows=0).history[0]
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=2e-3, abs=1e-4), k
    assert len(list((state_dir_for(tmp_path / "cached") / "teacher-cache").glob("step-*.pt"))) == 2


def test_cli_student_init_and_ce_distill(teacher: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["student", "init", str(teacher), str(tmp_path / "s"), "--layers", "1", "--hidden", "32",
                            "--ffn", "32"])
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output
    r = runner.invoke(app, ["distill", str(tmp_path / "o"), "--teacher", str(teacher), "--student", str(tmp_path / "s"),
                            "--loss", "ce", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                            "--dataset", str(FAST["dataset"])])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "config.json").exists() and (tmp_path / "o" / "tokenizer.json").exists()
    r = runner.invoke(app, ["distill", str(tmp_path / "o2"), "--teacher", str(teacher), "--student",
                            str(tmp_path / "s"), "--kl", "sideways"])
    assert r.exit_code == 1 and "--kl" in r.output
