"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3's attention.

Queries go through a low-rank bottleneck (q_a_proj -> RMSNorm -> q_b_proj, or one q_proj when
q_lora_rank is null). Keys and values share one compressed latent (kv_a_proj_with_mqa -> RMSNorm ->
kv_b_proj) plus a single RoPE'd key slice broadcast to every head ("decoupled RoPE"). The generation
cache holds only the latent and the rotated key, which is what makes MLA's cache small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.checkpoint.config import ModelConfig
from squeeze.model.norm import RMSNorm
from squeeze.model.rope import apply_rope, softmax_scale


@dataclass
class LatentCache:
    """One layer's generation cache: normalised KV latent [B, S, r] and rotated key [B, S, d_rope]."""

    latent: torch.Tensor | None = None
    k_rot: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.latent is None else self.latent.shape[1]

    def append(self, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.latent is None:
            self.latent, self.k_rot = latent, k_rot
        else:
            self.latent = torch.cat([self.latent, latent], dim=1)
            self.k_rot = torch.cat([self.k_rot, k_rot], dim=1)
        return self.latent, self.k_rot


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.scale = softmax_scale(config)
        qk = self.n_heads * config.qk_head_dim
        bias = config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.n_heads, -1).transpose(1, 2)  # [B, H, T, nope+rope]
        q_nope, q_rot = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rot = apply_rope(q_rot, cos, sin)

        kv = self.kv_a_proj_with_mqa(x)
        latent, k_rot = kv.split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rot = apply_rope(k_rot, cos, sin)  # [B, T, rope], shared by all heads
        past = 0
        if cache is not None:
            past = cache.length
            latent, k_rot = cache.append(latent, k_rot)
        s = latent.shape[1]

        kv = self.kv_b_proj(latent).view(b, s, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot[:, None].expand(b, self.n_heads, s, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=self.scale)
        else:  # new queries sit at positions past..past+t-1 and see every earlier key
            mask = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.v_dim))
