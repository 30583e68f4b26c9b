"""The recovery table: per-task scores of the base and each variant, and the variant/base ratios.

Recovery % of a variant = mean over tasks of (variant score / base score) x 100, with the ratio
inverted for lower-is-better metrics (perplexity), so 100% always means "as good as the base".
Average Score is the plain mean of the higher-is-better task scores (mixing in a perplexity would
make it meaningless). Both rules are printed in the table's footer.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field

# Which lm-eval metric stands for a task in the table, in order of preference.
PRIMARY_METRICS = ("acc", "exact_match", "acc_norm", "f1", "mcc", "word_perplexity", "perplexity",
                   "byte_perplexity", "bits_per_byte")

FOOTER = ("Recovery % = mean over tasks of variant score / base score x 100 (base / variant for "
          "lower-is-better metrics such as perplexity). Average Score = mean of the higher-is-better task "
          "scores (x100). Per-task stderr is in the JSON.")


@dataclass
class TaskScore:
    task: str
    metric: str
    value: float
    stderr: float | None
    higher_is_better: bool
    n_shot: int

    @property
    def shown(self) -> float:
        """The value as printed: accuracies as percentages, perplexities as they are."""
        return self.value * 100 if self.higher_is_better else self.value


@dataclass
class ModelResult:
    name: str
    path: str
    scores: dict[str, TaskScore]
    disk_bytes: int
    tokens_per_s: float | None = None
    backend: str = "squeeze"
    extra: dict = field(default_factory=dict)


def scores_from_lm_eval(results: dict) -> dict[str, TaskScore]:
    """One `TaskScore` per task of an lm-eval `simple_evaluate` result (its primary metric)."""
    out = {}
    for task, metrics in results["results"].items():
        names = {k.split(",")[0]: k for k in metrics if "," in k and "_stderr" not in k}
        metric = next((m for m in PRIMARY_METRICS if m in names), None) or next(iter(sorted(names)), None)
        if metric is None:
            continue
        key = names[metric]
        stderr = metrics.get(key.replace(",", "_stderr,", 1))
        hib = results.get("higher_is_better", {}).get(task, {}).get(metric, "perplexity" not in metric)
        out[task] = TaskScore(task, metric, float(metrics[key]),
                              float(stderr) if isinstance(stderr, int | float) else None,
                              bool(hib), int(results.get("n-shot", {}).get(task, 0)))
    return out


def task_ratio(base: TaskScore, variant: TaskScore) -> float:
    """How much of the base's score a variant keeps on one task (1.0 = all of it)."""
    if base.higher_is_better:
        return variant.value / base.value if base.value else float("nan")
    return base.value / variant.value if variant.value else float("nan")


def recovery(base: ModelResult, variant: ModelResult) -> float:
    """Recovery % of `variant` against `base` over the tasks both were scored on."""
    tasks = [t for t in base.scores if t in variant.scores]
    if not tasks:
        return float("nan")
    return 100 * sum(task_ratio(base.scores[t], variant.scores[t]) for t in tasks) / len(tasks)


def average_score(model: ModelResult) -> float:
    vals = [s.shown for s in model.scores.values() if s.higher_is_better]
    return sum(vals) / len(vals) if vals else float("nan")


@dataclass
class RecoveryTable:
    """Base first (100%), then the variants in the order given."""

    models: list[ModelResult]

    @property
    def tasks(self) -> list[str]:
        return list(self.models[0].scores)

    def header(self) -> list[str]:
        base = self.models[0].scores
        cols = [f"{t.removeprefix('squeeze_')} ({base[t].n_shot}-shot{', ppl' if not base[t].higher_is_better else ''})"
                for t in self.tasks]
        return ["Model", "Recovery %", "Average Score", *cols, "Size", "Compression", "Tokens/s"]

    def rows(self) -> list[list[str]]:
        base = self.models[0]
        out = []
        for m in self.models:
            cells = [m.name, f"{recovery(base, m):.2f}%", f"{average_score(m):.2f}"]
            cells += [f"{m.scores[t].shown:.2f}" if t in m.scores else "-" for t in self.tasks]
            cells += [f"{m.disk_bytes / 2**20:.1f} MiB", f"{base.disk_bytes / m.disk_bytes:.2f}x",
                      f"{m.tokens_per_s:.1f}" if m.tokens_per_s else "-"]
            out.append(cells)
        return out

    def to_markdown(self) -> str:
        head = self.header()
        lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows()]
        return "\n".join(lines) + f"\n\n{FOOTER}\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(self.header())
        writer.writerows(self.rows())
        return buf.getvalue()

    def to_dict(self) -> dict:
        base = self.models[0]
        return {
            "footer": FOOTER,
            "models": [{**asdict(m), "recovery_pct": recovery(base, m), "average_score": average_score(m),
                        "compression_ratio": base.disk_bytes / m.disk_bytes} for m in self.models],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True)

    def plot(self, path: str) -> None:
        """Bar chart: per-task recovery of each variant, plus the overall recovery."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        base = self.models[0]
        labels = [*self.tasks, "overall"]
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
        width = 0.8 / len(self.models)
        for k, m in enumerate(self.models):
            vals = [100 * task_ratio(base.scores[t], m.scores[t]) if t in m.scores else 0 for t in self.tasks]
            vals.append(recovery(base, m))
            ax.bar([i + k * width for i in range(len(labels))], vals, width, label=m.name)
        ax.axhline(100, color="black", linewidth=0.8)
        ax.set_xticks([i + width * (len(self.models) - 1) / 2 for i in range(len(labels))],
                      [lbl.removeprefix("squeeze_") for lbl in labels], rotation=20)
        ax.set_ylabel("recovery vs base (%)")
        lo = min(100.0, *(recovery(base, m) for m in self.models))
        ax.set_ylim(max(0, lo - 15), 110)
        ax.legend(fontsize="small")
        ax.set_title("Score recovery of compressed variants")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
