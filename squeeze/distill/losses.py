"""Distillation losses: logit (KL / reverse KL / generalized JSD), feature (MSE / cosine), relation.

Every loss is zero when the student reproduces the teacher and positive otherwise; the tests check
exactly that, and that the JSD reduces to the two KLs at its ends.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KL_KINDS = ("forward", "reverse", "jsd")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, summed over the last axis; 0·log 0 = 0 (masked/-inf entries)."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(-1)


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """β·KL(p‖m) + (1-β)·KL(q‖m), m = β·p + (1-β)·q, divided by β(1-β) (GKD's form, scaled).

    Divided this way it tends to KL(p‖q) as β→0 and to KL(q‖p) as β→1, so one knob slides
    between forward (mode-covering) and reverse (mode-seeking) KL; β = 0.5 is 4× the usual JSD.
    """
    if beta <= 0.0:
        return _kl(log_p, log_q)
    if beta >= 1.0:
        return _kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    return (beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)) / (beta * (1 - beta))


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  kind: str = "forward", beta: float = 0.5, support: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of the chosen divergence between softened distributions, times T².

    T² keeps the gradient scale independent of the temperature (Hinton et al.). `support` [.., k]
    restricts both distributions to the teacher's cached top-k tokens (renormalised), which is what
    `--cache-teacher` stores; then `teacher_logits` holds the k cached values.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}")
    s = student_logits.float() / temperature
    if support is not None:
        s = s.gather(-1, support)
    log_q = F.log_softmax(s, dim=-1)  # student
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # teacher
    if kind == "forward":
        d = _kl(log_p, log_q)
    elif kind == "reverse":
        d = _kl(log_q, log_p)
    else:
        d = generalized_jsd(log_p, log_q, beta)
    return d.mean() * temperature**2


def feature_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Hidden-state matching (already projected to the teacher's width): MSE, or 1 - cosine.

    MSE is normalised by the teacher's mean square so that its size does not depend on the
    residual stream's scale, which grows with depth.
    """
    s, t = student_hidden.float(), teacher_hidden.float()
    if kind == "mse":
        return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-8)
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    raise ValueError(f"unknown feature loss {kind!r}")


def map_heads(teacher_attn: torch.Tensor, student_heads: int) -> torch.Tensor:
    """Teacher attention maps [B, Ht, T, T] -> [B, Hs, T, T]: consecutive groups of heads averaged.

    When Ht is not a multiple of Hs, every student head is matched to the mean over all teacher heads.
    """
    b, ht, t, _ = teacher_attn.shape
    if ht == student_heads:
        return teacher_attn
    if ht % student_heads == 0:
        return teacher_attn.view(b, student_heads, ht // student_heads, t, t).mean(2)
    return teacher_attn.mean(1, keepdim=True).expand(b, student_heads, t, t)


def attention_kd_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor) -> torch.Tensor:
    """KL(teacher row ‖ student row) of causal attention distributions, mean over heads and rows."""
    teacher_attn = map_heads(teacher_attn.float(), student_attn.shape[1])
    log_p = teacher_attn.clamp_min(1e-30).log().masked_fill(teacher_attn == 0, float("-inf"))
    log_q = student_attn.float().clamp_min(1e-30).log()
    return _kl(log_p, log_q).mean()


def gram(hidden: torch.Tensor) -> torch.Tensor:
    """Token-to-token cosine similarity matrix [B, T, T]: width-free, so no projection is needed."""
    h = F.normalize(hidden.float(), dim=-1)
    return h @ h.transpose(-1, -2)


def gram_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(gram(student_hidden), gram(teacher_hidden))
