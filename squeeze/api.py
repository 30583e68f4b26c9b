"""Library entry points. The CLI and the tests call these; they raise `SqueezeError` on bad input."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from squeeze.checkpoint.reader import CheckpointReader
from squeeze.data import load_text, token_windows
from squeeze.errors import SqueezeError
from squeeze.inspect import CheckpointSummary, summarize
from squeeze.model.tokenizer import load_tokenizer
from squeeze.model.toy import ToySpec, TrainResult, make_toy
from squeeze.quant.runtime import QuantizedRuntime

__all__ = ["PerplexityResult", "ToySpec", "TrainResult", "evaluate", "generate", "inspect", "make_toy", "perplexity"]


def inspect(checkpoint: str | Path) -> CheckpointSummary:
    return summarize(CheckpointReader(checkpoint))


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int
    windows: int
    seconds: float


def perplexity(checkpoint: str | Path, text: str | Path = "corpus:heldout", seq_len: int = 128,
               max_windows: int | None = None, batch_size: int = 8, dtype: torch.dtype = torch.float32,
               device: str = "cpu", on_layer: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity over consecutive non-overlapping windows of `text`, run layer by layer from disk."""
    if seq_len < 2:
        raise SqueezeError("--seq-len must be at least 2")
    model = QuantizedRuntime(checkpoint, dtype=dtype, device=device)
    tok = load_tokenizer(checkpoint)
    windows = token_windows(tok.encode(load_text(text)).ids, seq_len, max_windows)
    start = time.perf_counter()
    hook = (lambda i, _layer: on_layer(i, model.num_layers)) if on_layer else None
    total, count = model.nll(windows, batch_size, hook)
    return PerplexityResult(math.exp(total / count), count, windows.shape[0], time.perf_counter() - start)


def generate(checkpoint: str | Path, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, device: str = "cpu") -> Iterator[str]:
    """Stream decoded text pieces for `prompt`; layers stay resident when the model is small."""
    reader = CheckpointReader(checkpoint)
    small = reader.file_size() < 2 * 1024**3
    model = QuantizedRuntime(reader, device=device, keep_layers=small)
    tok = load_tokenizer(checkpoint)
    ids = tok.encode(prompt).ids
    if not ids:
        raise SqueezeError("the prompt is empty after tokenization")
    eos = reader.config.raw.get("eos_token_id")
    new: list[int] = []
    shown = ""
    for t in model.generate(torch.tensor([ids]), max_new_tokens, temperature, top_k, eos, seed):
        new.append(t)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            yield text[len(shown):]
            shown = text


def quantize(model: str | Path, out: str | Path, method: str = "gptq", bits: int | None = None,
             group_size: int | None = None, symmetric: bool = True, act_order: bool = False,
             scheme: str | None = None, dataset: str | None = None, num_samples: int | None = None,
             seq_len: int | None = None, ignore: list[str] | None = None, recipe: str | Path | None = None,
             overwrite: bool = False, show_progress: bool = False, alpha: float | str | None = None,
             steps: int | None = None, lr: float | None = None,
             start: str | None = None):  # noqa: ANN201 - QuantizeReport (lazy import)
    """Quantize `model` into `out` (see `squeeze.quant`): a recipe file, or flags that build a one-rule recipe.

    Flags given with a recipe override its calibration section and add to its ignore list. `alpha` is
    SmoothQuant's migration strength (or "search"); `steps`, `lr`, `start` are QAT's. A recipe whose
    rules use `qat` runs the whole-model QAT trainer instead of the layer-by-layer pipeline.
    """
    from squeeze.quant.pipeline import quantize_checkpoint
    from squeeze.recipe import load_recipe, recipe_from_flags

    if recipe is not None:
        rec = load_recipe(recipe)
        rec.ignore += list(ignore or [])
    else:
        rec = recipe_from_flags(method, bits, group_size, symmetric, act_order, scheme, ignore,
                                alpha=alpha, steps=steps, lr=lr, start=start)
    cal = rec.calibration
    cal.dataset = dataset or cal.dataset
    cal.num_samples = num_samples or cal.num_samples
    cal.seq_len = seq_len or cal.seq_len
    if any(r.method == "qat" for r in rec.rules):
        from squeeze.quant.qat import quantize_qat

        return quantize_qat(model, out, rec, overwrite=overwrite, show_progress=show_progress)
    return quantize_checkpoint(model, out, rec, overwrite=overwrite, show_progress=show_progress)


def evaluate(base: str | Path, variants: list[str | Path] | tuple = (), tasks: list[str] | None = None,
             limit: int | None = None, batch_size: int = 8, device: str = "cpu", out: str | Path | None = None,
             backend: str = "squeeze", suite: str | None = None, workdir: str | Path | None = None,
             names: list[str] | None = None, on_model: Callable[[str], None] | None = None,
             note: Callable[[str], None] | None = None):  # noqa: ANN201 - EvalReport (lazy import: lm-eval is slow)
    """lm-eval scores of `base` and each variant and their recovery table (see `squeeze.evaluation`).

    With `suite="compression"`, the standard quantized variants of `base` are made first (under
    `workdir`, default OUT/variants) with whichever methods this build has, and added to `variants`.
    """
    from squeeze.evaluation.runner import DEFAULT_TASKS
    from squeeze.evaluation.runner import evaluate as run_eval
    from squeeze.evaluation.suite import build_variants

    variants = list(variants)
    labels = list(names) if names else None
    if suite is not None:
        if workdir is None and out is None:
            raise SqueezeError("--suite needs --out or --workdir to hold the quantized variants")
        work = Path(workdir) if workdir is not None else Path(out).parent / f"{Path(out).name}-variants"
        work.mkdir(parents=True, exist_ok=True)
        made = build_variants(Path(base), work, suite, note=note or print)
        labels = (labels or [Path(p).name for p in [base, *variants]]) + [n for n, _ in made]
        variants += [p for _, p in made]
    return run_eval(base, variants, tasks or DEFAULT_TASKS, limit, batch_size, device, out, backend,
                    names=labels, on_model=on_model)


def distill(teacher: str | Path, student: str | Path, out: str | Path, loss: str | None = None,
            recipe: str | Path | None = None, resume: bool = False, overwrite: bool = False,
            show_progress: bool = False, keep_state: bool = False,
            **settings: object):  # noqa: ANN201 - DistillResult (lazy import)
    """Distill `teacher` into the student checkpoint at `student`, writing the trained student to `out`.

    `settings` are `squeeze.distill.config.DistillConfig` fields (steps, temperature, alpha, kl, ...);
    they override the recipe's `distill:` section; None means "recipe or default".
    """
    from squeeze.distill.config import make_config
    from squeeze.distill.trainer import run_distill

    cfg = make_config(recipe, loss=loss, **settings)
    return run_distill(teacher, student, out, cfg, resume=resume, overwrite=overwrite,
                       show_progress=show_progress, keep_state=keep_state)
