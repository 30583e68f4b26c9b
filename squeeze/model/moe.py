"""DeepSeek's feed-forward blocks: the dense SwiGLU MLP, the router, and the MoE layer.

The router implements both generations:
- V3 (`scoring_func: sigmoid`, `topk_method: noaux_tc`): sigmoid scores; the choice of experts adds
  `e_score_correction_bias` (DeepSeek's auxiliary-loss-free balancing) but the mixing weights use the
  raw scores; experts are grouped, the best `topk_group` groups (by the sum of each group's top-2
  scores) are kept, then top-k inside them; weights normalised and scaled by `routed_scaling_factor`.
- V2 (`softmax`, `greedy` or `group_limited_greedy` with the group max as the group score).

The MoE layer records how many tokens each expert received (`last_counts`), which the toy trainer uses
for the bias update and the quantization pipeline reports as expert coverage. With
`observe_all_experts` set, every expert also runs on every token, output discarded, so that observers
on rarely-routed experts still see calibration data; the layer's output keeps the true routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.checkpoint.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Named `gate` in checkpoints: `mlp.gate.weight` [E, D] and, for V3, `e_score_correction_bias`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e = config.n_routed_experts or 0
        self.n_experts = e
        self.top_k = config.num_experts_per_tok or 1
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scoring = config.scoring_func
        self.method = config.topk_method
        self.norm_topk = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(e, config.hidden_size))
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(e))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] fp32, expert indices [N, k])."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        n = x.shape[0]
        per_group = self.n_experts // self.n_group
        if self.method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.float()
            group_scores = choice.view(n, self.n_group, per_group).topk(2, dim=-1)[0].sum(-1)
            choice = self._mask_groups(choice, group_scores, float("-inf"))
            idx = choice.topk(self.top_k, dim=-1)[1]
            weights = scores.gather(1, idx)
        elif self.method == "group_limited_greedy":
            group_scores = scores.view(n, self.n_group, per_group).amax(dim=-1)
            weights, idx = self._mask_groups(scores, group_scores, 0.0).topk(self.top_k, dim=-1)
        else:
            weights, idx = scores.topk(self.top_k, dim=-1)
        if self.norm_topk and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx

    def _mask_groups(self, scores: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        if self.n_group <= 1 or self.topk_group >= self.n_group:
            return scores
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], True)
        keep = keep.repeat_interleave(self.n_experts // self.n_group, dim=1)
        return scores.masked_fill(~keep, fill)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e = config.n_routed_experts or 0
        self.gate = Router(config)
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(e))
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.observe_all_experts = False
        self.last_counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx = self.gate(flat)
        self.last_counts = torch.bincount(idx.flatten(), minlength=len(self.experts)).detach()
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if self.observe_all_experts:
                # Statistics only: the expert sees every token, the output uses just its routed ones.
                y = expert(flat)[tok]
            elif tok.numel() == 0:
                continue
            else:
                y = expert(flat[tok])
            out.index_add_(0, tok, (y * weights[tok, slot, None]).to(out.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)
