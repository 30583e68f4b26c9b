"""Run a quantized checkpoint with squeeze's own runtime, activations quantized as the scheme says.

The reader already decodes stored weights (compressed-tensors or DeepSeek FP8) exactly; what it cannot
know is the dynamic activation quantization of W8A8 / FP8-block schemes. `activation_schemes` reads it
from `quantization_config`, and `QuantizedRuntime` wraps those Linears of each layer as it is loaded,
so perplexity and logits reflect what a W8A8 kernel computes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from squeeze.checkpoint.config import ModelConfig
from squeeze.checkpoint.reader import CheckpointReader
from squeeze.model.decoder import DecoderLayer
from squeeze.model.runtime import LayerwiseModel
from squeeze.quant.observers import fake_quantize_activations
from squeeze.quant.scheme import QuantArgs


class ActQuantLinear(nn.Module):
    """A Linear whose input is quantized-dequantized dynamically (per token / per 1xG group)."""

    def __init__(self, linear: nn.Linear, args: QuantArgs) -> None:
        super().__init__()
        self.linear, self.args = linear, args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(fake_quantize_activations(x, self.args))


def _args_from_ct(d: dict) -> QuantArgs:
    return QuantArgs(num_bits=d.get("num_bits", 8), type=d.get("type", "int"), strategy=d.get("strategy", "token"),
                     group_size=d.get("group_size"), symmetric=d.get("symmetric", True), dynamic=True)


def activation_schemes(reader: CheckpointReader) -> list[tuple[re.Pattern[str] | None, QuantArgs]]:
    """(module-name pattern, activation args) pairs; a None pattern matches every FP8-block Linear."""
    qc = reader.config.quantization_config or {}
    if qc.get("quant_method") == "fp8" and qc.get("activation_scheme") == "dynamic":
        g = int(qc.get("weight_block_size", [128, 128])[1])
        return [(None, QuantArgs(num_bits=8, type="float", strategy="group", group_size=g, dynamic=True))]
    out = []
    if qc.get("quant_method") == "compressed-tensors":
        for group in (qc.get("config_groups") or {}).values():
            acts = group.get("input_activations")
            if acts:
                for t in group.get("targets", []):
                    if t.startswith("re:"):
                        out.append((re.compile(t[3:]), _args_from_ct(acts)))
    return out


class QuantizedRuntime(LayerwiseModel):
    """LayerwiseModel that also applies the checkpoint's dynamic activation quantization.

    On a checkpoint without activation quantization it is exactly LayerwiseModel, so every command that
    runs a checkpoint (perplexity, generate, eval) uses this class and needs no "is it quantized?" branch.
    """

    def __init__(self, checkpoint: str | Path | CheckpointReader, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", keep_layers: bool = False) -> None:
        super().__init__(checkpoint, dtype=dtype, device=device, keep_layers=keep_layers)
        self._acts = activation_schemes(self.reader)

    def load_layer(self, index: int) -> DecoderLayer:
        layer = super().load_layer(index)
        if not self._acts:
            return layer
        prefix = self.reader.layer_prefix(index)
        for local, m in list(layer.named_modules()):
            if not isinstance(m, nn.Linear):
                continue
            full = prefix + local
            args = self._match(full)
            if args is not None:
                parent, _, child = local.rpartition(".")
                setattr(layer.get_submodule(parent), child, ActQuantLinear(m, args))
        return layer

    def _match(self, name: str) -> QuantArgs | None:
        for pattern, args in self._acts:
            if pattern is None:
                if name + ".weight_scale_inv" in self.reader:
                    return args
            elif pattern.match(name):
                return args
        return None


def quantized_perplexity(checkpoint: str | Path, windows: torch.Tensor, batch_size: int = 8) -> float:
    total, count = QuantizedRuntime(checkpoint).nll(windows, batch_size)
    return math.exp(total / count)


def is_quantized(config: ModelConfig) -> bool:
    return bool(config.quantization_config)
