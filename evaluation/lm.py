"""lm-eval's `LM` interface over squeeze's own runtime.

Going through `QuantizedRuntime` (squeeze's layer-by-layer runtime plus the checkpoint's dynamic activation
quantization) rather than transformers means a quantized checkpoint is scored by the
same code that serves it (squeeze's kernels on a GPU, fake-quant on the CPU), and a model too large
for memory is still evaluated one layer at a time. Requests are grouped into length-sorted,
right-padded batches (safe for a causal model: a position never sees the padding after it) and each
group goes through the model layer-major, so a streamed layer is read once per group, not per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from squeeze.checkpoint.reader import CheckpointReader
from squeeze.model.tokenizer import BOS, EOS, load_tokenizer
from squeeze.quant.runtime import QuantizedRuntime

# Models below this size keep their layers in memory: re-reading them per batch group would dominate.
_KEEP_LAYERS_BYTES = 2 * 1024**3
# Batches passed to one layer-major pass: bounds activation memory while amortising layer reads.
_BATCHES_PER_PASS = 16

TokenPair = tuple[list[int], list[int]]


class SqueezeLM(TemplateLM):
    """Score and generate with a squeeze checkpoint for lm-eval (`simple_evaluate(model=SqueezeLM(...))`)."""

    def __init__(self, checkpoint: str | Path, batch_size: int = 8, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_length: int | None = None,
                 keep_layers: bool | None = None) -> None:
        super().__init__()
        reader = CheckpointReader(checkpoint)
        if keep_layers is None:
            keep_layers = reader.file_size() < _KEEP_LAYERS_BYTES
        self.model = QuantizedRuntime(reader, dtype=dtype, device=device, keep_layers=keep_layers)
        self.tokenizer = load_tokenizer(checkpoint)
        raw = self.model.config.raw
        self._eos = raw.get("eos_token_id", self.tokenizer.token_to_id(EOS))
        bos = raw.get("bos_token_id", self.tokenizer.token_to_id(BOS))
        # Same choice as lm-eval's HF backend: BOS stands in for an empty context, else EOS.
        self._prefix = bos if bos is not None else self._eos
        self.max_length = max_length or int(raw.get("max_position_embeddings", 2048))
        self.batch_size = max(1, batch_size)

    # ---- tokenization (TemplateLM hooks) ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: object) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # ---- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def score_tokens(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy output) for each pair.

        The sequence is cut on the left to `max_length + 1` tokens and its last token dropped, as the
        model predicts token t+1 from position t; the continuation's scores are the last positions.
        """
        items = []
        for ctx, cont in pairs:
            whole = (ctx + cont)[-(self.max_length + 1):]
            items.append((whole[:-1], whole[-len(cont):]))
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(items)
        groups = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for start in range(0, len(groups), _BATCHES_PER_PASS):
            chunk = groups[start:start + _BATCHES_PER_PASS]
            batches = []
            for group in chunk:
                width = max(len(items[i][0]) for i in group)
                ids = torch.zeros(len(group), width, dtype=torch.long)
                for row, i in enumerate(group):
                    inp = items[i][0]
                    ids[row, :len(inp)] = torch.tensor(inp)
                batches.append(ids)
            for group, hidden in zip(chunk, self.model.hidden_states(batches), strict=True):
                for row, i in enumerate(group):
                    inp, cont = items[i]
                    n = len(cont)
                    logp = F.log_softmax(self.model.head(hidden[row, len(inp) - n:len(inp)]).float(), dim=-1)
                    target = torch.tensor(cont, device=logp.device)
                    total = float(logp.gather(-1, target[:, None]).sum())
                    results[i] = (total, bool((logp.argmax(-1) == target).all()))
        return results

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **_: object) -> list[tuple[float, bool]]:
        results = self.score_tokens([(ctx, cont) for _key, ctx, cont in requests])
        for (key, _ctx, _cont), res in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of at most `max_length` tokens."""
        pairs: list[TokenPair] = []
        owners: list[int] = []
        for n, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for w in map(make_disjoint_window, windows):
                pairs.append(w)
                owners.append(n)
        sums = [0.0] * len(requests)
        for owner, (logp, _greedy) in zip(owners, self.score_tokens(pairs), strict=True):
            sums[owner] += logp
        for req, total in zip(requests, sums, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return sums

    # ---- generation --------------------------------------------------------------------------------
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until a stop string, EOS or `max_gen_toks` tokens."""
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            new: list[int] = []
            text = ""
            for token in self.model.generate(torch.tensor([ids]), max_new, 0.0, 0, self._eos, 0):
                if token == self._eos:
                    break
                new.append(token)
                text = self.tok_decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out
