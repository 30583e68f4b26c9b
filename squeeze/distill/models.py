"""Loading whole models for distillation and running them with the internals the losses need.

Distillation of a toy-sized teacher runs the teacher every step, so it is held in memory as a
`CausalLM`; a teacher too large for that goes through `--cache-teacher` (see `cache.py`), which runs it
layer-major from disk once. `forward_with_states` exposes the residual stream after every layer and
the attention probabilities of chosen layers without touching `squeeze/model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from squeeze.checkpoint.config import ModelConfig
from squeeze.checkpoint.reader import CheckpointReader
from squeeze.model.attention import MLAttention
from squeeze.model.decoder import CausalLM, load_module
from squeeze.model.rope import RotaryTable, apply_rope


def load_causal_lm(checkpoint: str | Path | CheckpointReader, dtype: torch.dtype = torch.float32) -> CausalLM:
    """The whole checkpoint as a trainable `CausalLM` (FP8 dequantized on read, names checked)."""
    reader = checkpoint if isinstance(checkpoint, CheckpointReader) else CheckpointReader(checkpoint)
    with torch.device("meta"):
        model = CausalLM(reader.config)
    tensors = reader.read(reader.names, dtype)
    load_module(model, tensors, "")
    model.rope = RotaryTable(reader.config)  # built on the meta device above; its tables must be real
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Teacher mode: no parameter asks for a gradient, so autograd keeps no memory for it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def attention_probs(attn: MLAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Causal attention probabilities [B, H, T, T] of an MLAttention on its (normed) input `x`.

    MLAttention calls scaled_dot_product_attention, which never materialises the probabilities;
    this re-derives q and k exactly as `squeeze/model/attention.py` does (same projections, same
    interleaved RoPE, same softmax scale) and applies the softmax itself.
    """
    b, t, _ = x.shape
    q = attn.q_proj(x) if hasattr(attn, "q_proj") else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q = q.view(b, t, attn.n_heads, -1).transpose(1, 2)
    q_nope, q_rot = q.split([attn.nope_dim, attn.rope_dim], dim=-1)
    q_rot = apply_rope(q_rot, cos, sin)
    latent, k_rot = attn.kv_a_proj_with_mqa(x).split([attn.kv_rank, attn.rope_dim], dim=-1)
    latent = attn.kv_a_layernorm(latent)
    k_rot = apply_rope(k_rot, cos, sin)
    kv = attn.kv_b_proj(latent).view(b, t, attn.n_heads, attn.nope_dim + attn.v_dim).transpose(1, 2)
    k_nope = kv[..., : attn.nope_dim]
    k = torch.cat([k_nope, k_rot[:, None].expand(b, attn.n_heads, t, attn.rope_dim)], dim=-1)
    q = torch.cat([q_nope, q_rot], dim=-1)
    scores = (q @ k.transpose(-1, -2)).float() * attn.scale
    mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


@dataclass
class ForwardStates:
    """What one forward pass exposes: logits, the residual stream after each layer, attention maps."""

    logits: torch.Tensor
    hidden: list[torch.Tensor] = field(default_factory=list)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)


def forward_with_states(model: CausalLM, input_ids: torch.Tensor, attention_layers: tuple[int, ...] = (),
                        keep_hidden: bool = True) -> ForwardStates:
    """Same computation as `CausalLM.forward`, also returning per-layer hidden states and attention maps."""
    h = model.model.embed_tokens(input_ids)
    cos, sin = model.rope.get(0, input_ids.shape[1], h.device)
    hidden: list[torch.Tensor] = []
    attentions: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        if i in attention_layers:
            attentions[i] = attention_probs(layer.self_attn, layer.input_layernorm(h), cos, sin)
        h = layer(h, cos, sin)
        if keep_hidden:
            hidden.append(h)
    return ForwardStates(model.lm_head(model.model.norm(h)), hidden, attentions)


def count_parameters(config: ModelConfig, model: CausalLM, active: bool = True) -> tuple[int, int]:
    """(non-embedding, embedding) parameter counts; `active` counts only top-k routed experts per token."""
    embed = model.model.embed_tokens.weight.numel()
    if not config.tie_word_embeddings:
        embed += model.lm_head.weight.numel()
    total = sum(p.numel() for p in model.parameters()) - embed
    if active:
        for moe in model.moe_layers():
            per_expert = sum(p.numel() for p in moe.experts[0].parameters())
            total -= per_expert * (len(moe.experts) - (config.num_experts_per_tok or 0))
    return total, embed
