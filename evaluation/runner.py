"""Run lm-eval on a base model and its variants and assemble the recovery table.

Everything here works offline: the bundled tasks read their data from `evaluation/tasks/`, and a
standard lm-eval task is accepted only when its dataset is already in the local Hugging Face cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from squeeze.checkpoint.reader import CheckpointReader
from squeeze.errors import SqueezeError

from .recovery import ModelResult, RecoveryTable, scores_from_lm_eval

TASKS_DIR = Path(__file__).parent / "tasks"
DEFAULT_TASKS = ("squeeze_cloze", "squeeze_sentence_order", "squeeze_word_choice", "squeeze_heldout_ppl")
BACKENDS = ("squeeze", "hf")


def _offline() -> None:
    """Nothing is fetched from the hub at run time: datasets and models come from local files/cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def task_manager():  # noqa: ANN201 - lm_eval.tasks.TaskManager (imported lazily: lm-eval is slow to import)
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def check_tasks(tasks: Sequence[str], manager) -> None:  # noqa: ANN001
    """Fail fast, one line per problem, before any model is loaded."""
    from lm_eval.tasks import get_task_dict

    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            raise SqueezeError(f"unknown lm-eval task '{name}' (bundled: {', '.join(DEFAULT_TASKS)})")
        try:
            with warnings.catch_warnings():  # deprecated in newer lm-eval, but the one call all 0.4.x have
                warnings.simplefilter("ignore", DeprecationWarning)
                get_task_dict([name], manager)
        except Exception as e:  # datasets raises several types when offline and uncached
            raise SqueezeError(f"task '{name}': its data is not in the local Hugging Face cache and squeeze runs "
                               f"offline (download it once with `datasets` while online) [{type(e).__name__}]") from e


def make_lm(checkpoint: Path, backend: str, batch_size: int, device: str, max_length: int | None):  # noqa: ANN201
    """The lm-eval model object for one checkpoint: squeeze's runtime, or lm-eval's own HF backend."""
    if backend == "squeeze":
        from .lm import SqueezeLM

        return SqueezeLM(checkpoint, batch_size=batch_size, device=device, max_length=max_length)
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=str(checkpoint), dtype="float32", device=device, batch_size=batch_size,
                    max_length=max_length)
    raise SqueezeError(f"unknown backend '{backend}' (one of {', '.join(BACKENDS)})")


def tokens_per_second(lm, new_tokens: int = 64) -> float | None:  # noqa: ANN001
    """Greedy decode speed of the squeeze runtime on CUDA (CPU speed says nothing about deployment)."""
    model = getattr(lm, "model", None)
    if model is None or not hasattr(model, "generate") or model.device.type != "cuda":
        return None
    prompt = torch.tensor([lm.tok_encode("And God said, Let there be light")])
    list(model.generate(prompt, 4, 0.0, 0, None, 0))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    n = sum(1 for _ in model.generate(prompt, new_tokens, 0.0, 0, None, 0))
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def evaluate_model(checkpoint: Path, tasks: Sequence[str], manager, name: str | None = None,  # noqa: ANN001
                   limit: int | None = None, batch_size: int = 8, device: str = "cpu", backend: str = "squeeze",
                   max_length: int | None = None) -> ModelResult:
    """lm-eval scores of one checkpoint on `tasks`, with its size on disk and (CUDA) decode speed."""
    import lm_eval

    _offline()
    reader = CheckpointReader(checkpoint)
    lm = make_lm(Path(checkpoint), backend, batch_size, device, max_length)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  log_samples=False, bootstrap_iters=1000, verbosity="ERROR")
    return ModelResult(name or Path(checkpoint).name, str(checkpoint), scores_from_lm_eval(res),
                       reader.file_size(), tokens_per_second(lm), backend)


@dataclass
class EvalReport:
    table: RecoveryTable
    out: Path | None
    seconds: float


def write_outputs(table: RecoveryTable, out: Path, overwrite: bool = True) -> None:
    """Markdown, CSV, JSON and PNG into `out`, all or nothing (temp dir renamed into place)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SqueezeError(f"{out} exists (use --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "recovery.md").write_text(table.to_markdown(), encoding="utf-8")
        (tmp / "recovery.csv").write_text(table.to_csv(), encoding="utf-8")
        (tmp / "recovery.json").write_text(table.to_json(), encoding="utf-8")
        table.plot(str(tmp / "recovery.png"))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def evaluate(base: str | Path, variants: Sequence[str | Path] = (), tasks: Sequence[str] = DEFAULT_TASKS,
             limit: int | None = None, batch_size: int = 8, device: str = "cpu", out: str | Path | None = None,
             backend: str = "squeeze", max_length: int | None = None, names: Sequence[str] | None = None,
             on_model: Callable[[str], None] | None = None) -> EvalReport:
    """Score `base` and each variant on `tasks` and build the recovery table (base is the 100% row)."""
    start = time.perf_counter()
    if backend not in BACKENDS:
        raise SqueezeError(f"unknown backend '{backend}' (one of {', '.join(BACKENDS)})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SqueezeError("--device cuda requested but no CUDA device is available")
    if limit is not None and limit < 1:
        raise SqueezeError("--limit must be at least 1")
    paths = [Path(base), *map(Path, variants)]
    for p in paths:
        if not (p / "config.json").is_file():
            raise SqueezeError(f"{p} is not a checkpoint directory (no config.json)")
        if not (p / "tokenizer.json").is_file():
            raise SqueezeError(f"{p} has no tokenizer.json; evaluation needs the model's tokenizer")
    labels = list(names) if names else [p.name for p in paths]
    if len(labels) != len(paths):
        raise SqueezeError(f"--names gives {len(labels)} labels for {len(paths)} models")
    _offline()
    manager = task_manager()
    check_tasks(tasks, manager)
    results = []
    for path, label in zip(paths, labels, strict=True):
        if on_model:
            on_model(label)
        results.append(evaluate_model(path, tasks, manager, label, limit, batch_size, device, backend, max_length))
    table = RecoveryTable(results)
    if out is not None:
        write_outputs(table, Path(out))
    return EvalReport(table, Path(out) if out is not None else None, time.perf_counter() - start)
