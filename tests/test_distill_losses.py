"""Distillation losses: zero at the teacher, positive elsewhere, JSD's limits, attention maps re-derived right."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from squeeze.checkpoint.config import parse_config
from squeeze.distill.losses import (
    _kl,
    attention_kd_loss,
    feature_loss,
    generalized_jsd,
    gram_loss,
    logit_kd_loss,
    map_heads,
)
from squeeze.distill.models import attention_probs
from squeeze.model.attention import MLAttention
from squeeze.model.rope import RotaryTable
from squeeze.model.toy import toy_config_dict
from tests.conftest import SMALL

torch.manual_seed(0)
T_LOGITS = torch.randn(2, 5, 11) * 2
S_LOGITS = torch.randn(2, 5, 11) * 2


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logit_loss_zero_at_teacher_positive_elsewhere(kind: str, temperature: float) -> None:
    assert logit_kd_loss(T_LOGITS, T_LOGITS, temperature, kind).item() == pytest.approx(0.0, abs=1e-6)
    assert logit_kd_loss(S_LOGITS, T_LOGITS, temperature, kind).item() > 0.05


def test_forward_kl_matches_torch_and_scales_by_t_squared() -> None:
    t = 2.0
    ref = F.kl_div(F.log_softmax(S_LOGITS / t, -1), F.log_softmax(T_LOGITS / t, -1), log_target=True,
                   reduction="none").sum(-1).mean() * t * t
    assert logit_kd_loss(S_LOGITS, T_LOGITS, t, "forward").item() == pytest.approx(ref.item(), rel=1e-5)


def test_reverse_is_forward_with_roles_swapped() -> None:
    assert logit_kd_loss(S_LOGITS, T_LOGITS, 1.0, "reverse").item() == pytest.approx(
        logit_kd_loss(T_LOGITS, S_LOGITS, 1.0, "forward").item(), rel=1e-5)


def test_jsd_limits_are_the_two_kls() -> None:
    log_p, log_q = F.log_softmax(T_LOGITS.double(), -1), F.log_softmax(S_LOGITS.double(), -1)
    fwd, rev = _kl(log_p, log_q), _kl(log_q, log_p)
    assert torch.allclose(generalized_jsd(log_p, log_q, 0.0), fwd)
    assert torch.allclose(generalized_jsd(log_p, log_q, 1.0), rev)
    # and continuously: the relative gap shrinks with β (resp. 1 - β), to under 1% at 1e-6
    gaps_fwd = [((generalized_jsd(log_p, log_q, b) - fwd).abs() / fwd).max().item() for b in (1e-2, 1e-4, 1e-6)]
    gaps_rev = [((generalized_jsd(log_p, log_q, 1 - b) - rev).abs() / rev).max().item() for b in (1e-2, 1e-4, 1e-6)]
    for gaps in (gaps_fwd, gaps_rev):
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2
    mid = generalized_jsd(log_p, log_q, 0.5)
    assert (mid > 0).all() and not torch.allclose(mid, fwd, rtol=0.05)


def test_topk_support_restricts_both_distributions() -> None:
    values, idx = T_LOGITS.topk(4, dim=-1)
    assert logit_kd_loss(T_LOGITS, values, 1.0, "forward", support=idx).item() == pytest.approx(0.0, abs=1e-6)
    assert logit_kd_loss(S_LOGITS, values, 1.0, "forward", support=idx).item() > 0.01
    full = values.new_full(T_LOGITS.shape, -1e4).scatter(-1, idx, values)  # the same, written densely
    assert logit_kd_loss(S_LOGITS, values, 1.0, "forward", support=idx).item() == pytest.approx(
        logit_kd_loss(S_LOGITS.gather(-1, idx), full.gather(-1, idx), 1.0, "forward").item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss(kind: str) -> None:
    h = torch.randn(2, 6, 16)
    assert feature_loss(h, h, kind).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(h + 0.5 * torch.randn_like(h), h, kind).item() > 0.01


def _causal_probs(b: int, h: int, t: int) -> torch.Tensor:
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.randn(b, h, t, t).masked_fill(~mask, float("-inf")).softmax(-1)


def test_attention_and_gram_losses() -> None:
    a, b = _causal_probs(2, 4, 7), _causal_probs(2, 4, 7)
    assert attention_kd_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_kd_loss(b, a).item() > 0.01
    # 4 teacher heads onto 2 student heads: groups of two averaged; a student equal to that mean scores 0
    assert attention_kd_loss(map_heads(a, 2), a).item() == pytest.approx(0.0, abs=1e-6)
    h = torch.randn(2, 7, 16)
    assert gram_loss(h, h).item() == pytest.approx(0.0, abs=1e-7)
    assert gram_loss(torch.randn(2, 7, 8), h).item() > 1e-3  # widths may differ


def test_attention_probs_reproduce_mla_output() -> None:
    """probs @ v through o_proj must equal MLAttention.forward: the maps are the ones the model uses."""
    cfg = parse_config(toy_config_dict(SMALL))
    torch.manual_seed(1)
    attn = MLAttention(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    x = torch.randn(2, 9, cfg.hidden_size)
    cos, sin = RotaryTable(cfg).get(0, 9)
    with torch.no_grad():
        probs = attention_probs(attn, x, cos, sin)
        latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(x)[..., : attn.kv_rank])
        v = attn.kv_b_proj(latent).view(2, 9, attn.n_heads, -1).transpose(1, 2)[..., attn.nope_dim:]
        ours = attn.o_proj((probs @ v).transpose(1, 2).reshape(2, 9, -1))
        ref = attn(x, cos, sin)
    assert torch.allclose(probs.sum(-1), torch.ones(2, attn.n_heads, 9), atol=1e-5)
    assert probs[..., 0, 1:].abs().max().item() == 0.0  # causal
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)
