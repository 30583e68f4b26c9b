"""`squeeze eval`: lm-eval scores of a base model and its variants, and the recovery table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from squeeze.console import console, handle_errors


def register(app: typer.Typer) -> None:
    """Add `squeeze eval` to the squeeze CLI."""

    @app.command("eval")
    @handle_errors
    def eval_command(
        models: Annotated[list[Path], typer.Argument(help="BASE first, then VARIANT... checkpoint directories.")],
        tasks: Annotated[str | None, typer.Option(help="Comma-separated lm-eval tasks (default: the bundled "
                                                        "offline tasks).")] = None,
        limit: Annotated[int | None, typer.Option(help="Documents per task (default: all).")] = None,
        batch_size: Annotated[int, typer.Option(help="Requests per forward batch.")] = 8,
        device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
        out: Annotated[Path | None, typer.Option(help="Write recovery.{md,csv,json,png} here.")] = None,
        backend: Annotated[str, typer.Option(help="squeeze (our runtime) or hf (lm-eval's HF model, a "
                                                  "cross-check on exported checkpoints).")] = "squeeze",
        suite: Annotated[str | None, typer.Option(help="'compression': quantize MODEL into the standard "
                                                       "variants first, then evaluate all.")] = None,
        workdir: Annotated[Path | None, typer.Option(help="Where --suite writes its variants "
                                                          "(default: OUT-variants).")] = None,
        names: Annotated[str | None, typer.Option(help="Comma-separated row labels for the models given "
                                                       "(default: directory names).")] = None,
    ) -> None:
        """Score BASE and each VARIANT with lm-evaluation-harness and print the recovery table."""
        from squeeze import api

        task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
        labels = [n.strip() for n in names.split(",")] if names else None
        with console.status("evaluating") as status:
            report = api.evaluate(models[0], models[1:], tasks=task_list, limit=limit, batch_size=batch_size,
                                  device=device, out=out, backend=backend, suite=suite, workdir=workdir,
                                  names=labels,
                                  on_model=lambda name: status.update(f"evaluating {name}"),
                                  note=lambda msg: console.print(f"[yellow]{msg}[/]"))
        print_table(report.table)
        if report.out is not None:
            console.print(f"wrote {report.out}/recovery.{{md,csv,json,png}} in {report.seconds:.0f}s")


def print_table(table) -> None:  # noqa: ANN001 - squeeze.evaluation.recovery.RecoveryTable
    from rich.table import Table

    from squeeze.evaluation.recovery import FOOTER

    t = Table(title="recovery vs base", caption=FOOTER, title_justify="left")
    for i, col in enumerate(table.header()):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in table.rows():
        t.add_row(*row)
    console.print(t)
