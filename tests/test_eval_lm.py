"""The lm-eval wrapper over squeeze's runtime: its scores are the model's own forward pass, and lm-eval's
HF backend gives the same task scores on the same checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from squeeze.data import corpus_text
from squeeze.model.runtime import LayerwiseModel
from squeeze.model.tokenizer import save_tokenizer, train_bpe

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from squeeze.evaluation.lm import SqueezeLM  # noqa: E402
from squeeze.evaluation.runner import evaluate_model, task_manager  # noqa: E402


@pytest.fixture
def small_with_tokenizer(small_ckpt: Path, small_spec) -> Path:  # noqa: ANN001
    """The tiny random checkpoint plus a BPE tokenizer of its vocabulary size (no training needed)."""
    save_tokenizer(train_bpe(corpus_text("heldout")[:40_000], small_spec.vocab), small_ckpt, 256)
    return small_ckpt


def _req(kind: str, args: tuple, idx: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


def test_loglikelihood_equals_direct_forward_pass(small_with_tokenizer: Path) -> None:
    lm = SqueezeLM(small_with_tokenizer, batch_size=2)  # batches mix lengths: right padding must not matter
    model = LayerwiseModel(small_with_tokenizer)
    pairs = [("And God said,", " Let there be light"), ("In the beginning", " God created"),
             ("And the earth was without form, and void;", " and darkness"), ("Amen", ".")]
    got = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (logp, greedy) in zip(pairs, got, strict=True):
        ctx_ids = lm.tok_encode(ctx)
        cont_ids = lm.tok_encode(ctx + cont)[len(ctx_ids):]
        ids = torch.tensor([ctx_ids + cont_ids])
        logits = F.log_softmax(model.logits(ids)[0, :-1], -1)[-len(cont_ids):]
        target = torch.tensor(cont_ids)
        want = float(logits.gather(-1, target[:, None]).sum())
        assert logp == pytest.approx(want, abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == target).all())


def test_rolling_loglikelihood_is_the_documents_nll(small_with_tokenizer: Path) -> None:
    text = corpus_text("heldout")[:3000]
    lm = SqueezeLM(small_with_tokenizer, batch_size=4, max_length=64)  # forces several windows
    (total,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    ids = [lm.prefix_token_id, *lm.tok_encode(text)]
    assert len(ids) > 3 * 64
    # Every token predicted once, from a window of at most 64 tokens: disjoint chunks of 64, and the
    # last (short) chunk sees the 64 tokens before its end, as lm-eval's rolling windows do.
    model = LayerwiseModel(small_with_tokenizer)
    want = 0.0
    for start in range(0, len(ids) - 1, 64):
        end = min(start + 65, len(ids))
        window = torch.tensor([ids[max(0, end - 65):end]])
        n = end - start - 1
        logp = F.log_softmax(model.logits(window[:, :-1])[0, -n:], -1)
        want += float(logp.gather(-1, window[0, -n:, None]).sum())
    assert total == pytest.approx(want, rel=1e-5)
    assert math.isfinite(total) and total < 0


def test_generate_until_is_greedy_and_stops(small_with_tokenizer: Path) -> None:
    lm = SqueezeLM(small_with_tokenizer)
    prompt = "And God said"
    free = lm.generate_until([_req("generate_until", (prompt, {"until": [], "max_gen_toks": 12}))])[0]
    ids = lm.tok_encode(prompt)
    greedy = list(lm.model.generate(torch.tensor([ids]), 12, 0.0, 0, lm.eot_token_id, 0))
    assert free == lm.tok_decode(greedy)
    stop = free[len(free) // 2:][:2]
    assert stop
    cut = lm.generate_until([_req("generate_until", (prompt, {"until": [stop], "max_gen_toks": 12}))])[0]
    assert cut == free.split(stop)[0]


def test_hf_backend_gives_the_same_scores(small_with_tokenizer: Path) -> None:
    """Cross-check: lm-eval's own HF model (transformers' DeepseekV3ForCausalLM) on the same checkpoint."""
    tm = task_manager()
    tasks = ["squeeze_cloze", "squeeze_heldout_ppl"]
    ours = evaluate_model(small_with_tokenizer, tasks, tm, limit=6, batch_size=4, max_length=128)
    hf = evaluate_model(small_with_tokenizer, tasks, tm, limit=6, batch_size=4, max_length=128, backend="hf")
    assert hf.backend == "hf"
    for task in tasks:
        a, b = ours.scores[task], hf.scores[task]
        assert a.metric == b.metric
        assert a.value == pytest.approx(b.value, rel=1e-4), task
    # A random model's perplexity is near the vocabulary size: a number, not a degenerate 0 or inf.
    assert 50 < ours.scores["squeeze_heldout_ppl"].value < 1e6
