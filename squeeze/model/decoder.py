"""A DeepSeek decoder layer and the whole causal LM, with parameter names equal to the checkpoint's.

Names matter: `CausalLM.state_dict()` keys are exactly the tensor names of the public release
(`model.layers.N.self_attn.kv_b_proj.weight`, `model.layers.N.mlp.experts.E.up_proj.weight`, ...), so
a layer is loaded by stripping its prefix and a trained model is saved without a renaming table.
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze.checkpoint.config import ModelConfig
from squeeze.errors import CheckpointError
from squeeze.model.attention import LatentCache, MLAttention
from squeeze.model.moe import MLP, MoE
from squeeze.model.norm import RMSNorm
from squeeze.model.rope import RotaryTable


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.self_attn = MLAttention(config)
        self.mlp: nn.Module = MoE(config) if config.is_moe_layer(index) else MLP(
            config.hidden_size, config.intermediate_size
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """The whole model in memory: for training the toy and for small models. Big ones stream."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryTable(config)

    def forward(self, input_ids: torch.Tensor, caches: list[LatentCache] | None = None) -> torch.Tensor:
        start = caches[0].length if caches else 0
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope.get(start, input_ids.shape[1], h.device)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, caches[i] if caches else None)
        return self.lm_head(self.model.norm(h))

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """state_dict in checkpoint naming (tied lm_head omitted, as transformers does)."""
        sd = self.state_dict()
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd


def load_module(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """Fill a module built on the meta device from checkpoint tensors named `prefix + local name`.

    Shape and presence are checked against the config-derived module first, so that a checkpoint
    that disagrees with its config.json fails with the tensor's name and both shapes.
    """
    expected = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    local: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not name.startswith(prefix):
            continue
        key = name[len(prefix):]
        if key not in expected:
            raise CheckpointError(f"unexpected tensor {name}: the config describes no such parameter")
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"tensor {name} has shape {list(t.shape)}, config.json implies {list(expected[key].shape)}"
            )
        local[key] = t
    missing = sorted(set(expected) - set(local))
    if missing:
        raise CheckpointError(f"tensor {prefix}{missing[0]} missing from checkpoint"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    module.load_state_dict(local, assign=True, strict=True)
    return module


def build_layer(config: ModelConfig, index: int, tensors: dict[str, torch.Tensor]) -> DecoderLayer:
    """One decoder layer from its checkpoint tensors, without allocating random init weights first."""
    with torch.device("meta"):
        layer = DecoderLayer(config, index)
    return load_module(layer, tensors, f"model.layers.{index}.")
