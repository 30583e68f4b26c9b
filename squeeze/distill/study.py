"""The distillation comparison: CE-only vs logit / feature / relation / hybrid KD, same student and data.

    python -m squeeze.distill.study WORKDIR [--teacher /work/toy-default] [--steps 200]

Every variant starts from the same randomly initialised student (hidden 128, 2 layers, FFN 256: about
a fifth of the default toy's active non-embedding parameters), sees the same batches for the same
number of steps, and is scored by `squeeze.api.perplexity` on its written (bf16) checkpoint, like the
teacher. The init options (random vs teacher-initialised, at the teacher's width) are measured too.
Results go to WORKDIR/results.json and WORKDIR/table.md, row by row, so a partial run keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from squeeze import api
from squeeze.console import console
from squeeze.distill.config import make_config
from squeeze.distill.student import init_student
from squeeze.distill.trainer import run_distill

# logit and hybrid take their recipes (T 1, alpha 0); feature and relation keep CE at alpha 0.5, since
# without it nothing would train the student's head.
RECIPES = {"logit": "recipes/distill-logit.yaml", "hybrid": "recipes/distill-hybrid.yaml"}
VARIANTS = [("a", "ce"), ("b", "logit"), ("c", "feature"), ("d", "relation"), ("e", "hybrid")]


def heldout_ppl(ckpt: Path, windows: int) -> float:
    return api.perplexity(ckpt, "corpus:heldout", seq_len=128, max_windows=windows).perplexity


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["| run | held-out ppl | non-emb params | emb params | train s | notes |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r.get('params', '')} | {r.get('emb', '')} | "
                     f"{r.get('seconds', '')} | {r.get('notes', '')} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--teacher", type=Path, default=Path("/work/toy-default"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--windows", type=int, default=128, help="held-out windows of 128 tokens")
    ap.add_argument("--only", default="", help="comma list of variant letters (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results.json"
    rows: list[dict] = json.loads(results.read_text()) if results.exists() else []
    done = {r["key"] for r in rows}

    def add(row: dict) -> None:
        rows.append(row)
        results.write_text(json.dumps(rows, indent=1))
        write_table(rows, work / "table.md")
        console.print(row)

    if "teacher" not in done:
        add({"key": "teacher", "name": "teacher (toy MoE)", "ppl": heldout_ppl(args.teacher, args.windows)})
    for init, hidden in (("random", 256), ("teacher", 256), ("random", 128)):
        key = f"init-{init}-{hidden}"
        if key in done:
            continue
        rep = init_student(args.teacher, work / key, 2, hidden, 256, init, overwrite=True)
        add({"key": key, "name": f"student init {init}, hidden {hidden}, untrained",
             "ppl": heldout_ppl(work / key, args.windows), "params": rep.params, "emb": rep.embedding_params,
             "notes": f"teacher active non-emb {rep.teacher_active_params}, emb {rep.teacher_embedding_params}"})
    student = work / "init-random-128"
    only = set(args.only.split(",")) if args.only else None
    for letter, loss in VARIANTS:
        key = f"{letter}-{loss}"
        if key in done or (only and letter not in only):
            continue
        recipe = RECIPES.get(loss)
        cfg = make_config(Path(__file__).parents[2] / recipe if recipe else None, loss=loss,
                          steps=args.steps, batch_size=args.batch_size, checkpoint_every=10**9)
        t0 = time.perf_counter()
        r = run_distill(args.teacher, student, work / key, cfg, overwrite=True)
        add({"key": key, "name": f"({letter}) {loss}", "ppl": heldout_ppl(work / key, args.windows),
             "seconds": round(time.perf_counter() - t0), "notes": f"final loss {r.history[-1]['loss']:.3f}, "
             f"T {cfg.temperature}, alpha {cfg.ce_weight}, weights {cfg.resolved_weights()}"})


if __name__ == "__main__":
    main()
