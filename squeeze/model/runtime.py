"""Run a checkpoint from disk one decoder layer at a time.

`LayerwiseModel` never builds the whole network: a layer is read (FP8 blocks dequantized as they are
read), run over every sequence in the batch, and freed before the next is read. The work is
layer-major: all sequences pass layer i before layer i+1 is loaded, so each layer is read from disk
once per call, and peak memory is one layer plus the activations, whatever the depth. The
quantization pipeline walks the model the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from squeeze.checkpoint.reader import CheckpointReader
from squeeze.errors import CheckpointError
from squeeze.model.attention import LatentCache
from squeeze.model.decoder import DecoderLayer, build_layer
from squeeze.model.norm import RMSNorm
from squeeze.model.rope import RotaryTable


class LayerwiseModel:
    """A DeepSeek checkpoint executed layer by layer; embeddings and head stay resident (small)."""

    def __init__(self, checkpoint: str | Path | CheckpointReader, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", keep_layers: bool = False) -> None:
        self.reader = checkpoint if isinstance(checkpoint, CheckpointReader) else CheckpointReader(checkpoint)
        self.config = self.reader.config
        self.dtype, self.device = dtype, torch.device(device)
        self.keep_layers = keep_layers  # generation re-runs every layer per token: keep them if small
        self._layers: dict[int, DecoderLayer] = {}
        self.rope = RotaryTable(self.config)
        cfg = self.config
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if "lm_head.weight" in self.reader:
            names.append("lm_head.weight")
        elif not cfg.tie_word_embeddings:
            raise CheckpointError("tensor lm_head.weight missing from checkpoint (and tie_word_embeddings is false)")
        t = self.reader.read(names, dtype)
        for name, shape in (("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)),
                            ("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))):
            if name in t and tuple(t[name].shape) != shape:
                raise CheckpointError(
                    f"tensor {name} has shape {list(t[name].shape)}, config.json implies {list(shape)}"
                )
        self.embed = t["model.embed_tokens.weight"].to(self.device)
        self.lm_head = t.get("lm_head.weight", t["model.embed_tokens.weight"]).to(self.device)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm.weight.data = t["model.norm.weight"].to(self.device)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    # ---- pieces -----------------------------------------------------------------------------
    def load_layer(self, index: int) -> DecoderLayer:
        if index in self._layers:
            return self._layers[index]
        names = self.reader.names_with_prefix(self.reader.layer_prefix(index))
        layer = build_layer(self.config, index, self.reader.read(names, self.dtype)).to(self.device).eval()
        if self.keep_layers:
            self._layers[index] = layer
        return layer

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids.to(self.device), self.embed)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(hidden), self.lm_head)

    def rotary(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope.get(start, length, self.device)

    # ---- whole passes -----------------------------------------------------------------------
    @torch.no_grad()
    def hidden_states(self, batches: list[torch.Tensor],
                      on_layer: Callable[[int, DecoderLayer], None] | None = None) -> list[torch.Tensor]:
        """Final hidden states (before the norm) of each [B, T] batch, layer-major."""
        hs = [self.embed_tokens(b) for b in batches]
        for i in range(self.num_layers):
            layer = self.load_layer(i)
            if on_layer is not None:
                on_layer(i, layer)
            for j, h in enumerate(hs):
                cos, sin = self.rotary(0, h.shape[1])
                hs[j] = layer(h, cos, sin)
            del layer
        return hs

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for one batch (fp32)."""
        return self.head(self.hidden_states([input_ids])[0]).float()

    @torch.no_grad()
    def nll(self, windows: torch.Tensor, batch_size: int = 8,
            on_layer: Callable[[int, DecoderLayer], None] | None = None) -> tuple[float, int]:
        """Summed next-token negative log-likelihood over [W, T] windows, and the token count."""
        batches = list(windows.split(batch_size))
        total, count = 0.0, 0
        for ids, h in zip(batches, self.hidden_states(batches, on_layer), strict=True):
            logits = self.head(h).float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(self.device),
                                   reduction="sum")
            total += loss.item()
            count += ids[:, 1:].numel()
        return total, count

    def perplexity(self, windows: torch.Tensor, batch_size: int = 8) -> float:
        total, count = self.nll(windows, batch_size)
        return math.exp(total / count)

    # ---- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, eos_id: int | None = None, seed: int = 0) -> Iterator[int]:
        """Yield new token ids for a [1, T] prompt, with an MLA latent cache per layer."""
        gen = torch.Generator().manual_seed(seed)
        caches = [LatentCache() for _ in range(self.num_layers)]
        ids = input_ids.to(self.device)
        pos = 0
        for _ in range(max_new_tokens):
            h = self.embed_tokens(ids)
            cos, sin = self.rotary(pos, ids.shape[1])
            for i in range(self.num_layers):
                h = self.load_layer(i)(h, cos, sin, caches[i])
            pos += ids.shape[1]
            logits = self.head(h[:, -1]).float()[0]
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k:
                    kth = logits.topk(min(top_k, logits.numel()))[0][-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen))
            yield nxt
            if eos_id is not None and nxt == eos_id:
                return
            ids = torch.tensor([[nxt]], device=self.device)
