"""`squeeze student init` and `squeeze distill` (library: `squeeze.distill`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from squeeze.console import console, handle_errors, human_count


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the squeeze CLI."""
    student = typer.Typer(help="make dense students for `squeeze distill`", no_args_is_help=True)
    app.add_typer(student, name="student")

    @student.command("init")
    @handle_errors
    def student_init(
        teacher: Annotated[Path, typer.Argument(help="teacher checkpoint (its tokenizer is shared)")],
        out: Annotated[Path, typer.Argument(help="output directory (must not exist)")],
        layers: Annotated[int, typer.Option(help="decoder layers")] = 2,
        hidden: Annotated[int, typer.Option(help="hidden size (--init teacher needs the teacher's)")] = 128,
        ffn: Annotated[int, typer.Option(help="dense MLP width")] = 256,
        init: Annotated[str, typer.Option(help="random | teacher (embeddings, attention, merged experts)")] = "random",
        layer_map: Annotated[str | None, typer.Option(help="student:teacher pairs, e.g. 0:1,1:3")] = None,
        seed: Annotated[int, typer.Option(help="random init seed")] = 0,
        overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
    ) -> None:
        """Make a dense DeepSeek-V3-layout student of TEACHER in OUT."""
        from squeeze.distill.student import init_student

        r = init_student(teacher, out, layers, hidden, ffn, init, layer_map, seed, overwrite)
        table = Table(title=f"student -> {out}")
        table.add_column("")
        table.add_column("value", justify="right")
        table.add_row("layers / hidden / ffn", f"{layers} / {hidden} / {ffn}")
        table.add_row("init", init + (f" (layer map {r.layer_map})" if init == "teacher" else ""))
        table.add_row("params (non-embedding)", f"{human_count(r.params)} "
                      f"({100 * r.params / r.teacher_active_params:.0f}% of teacher active)")
        table.add_row("embedding params", human_count(r.embedding_params))
        table.add_row("held-out perplexity after init", f"{r.perplexity:.2f}")
        console.print(table)

    @app.command("distill")
    @handle_errors
    def distill(
        out: Annotated[Path, typer.Argument(help="output directory for the trained student (must not exist)")],
        teacher: Annotated[Path, typer.Option(help="teacher checkpoint")],
        student: Annotated[Path, typer.Option(help="student checkpoint (from `squeeze student init`)")],
        loss: Annotated[str | None, typer.Option(help="ce | logit | feature | relation | hybrid")] = None,
        recipe: Annotated[Path | None, typer.Option(help="recipes/distill-*.yaml (flags override it)")] = None,
        dataset: Annotated[str | None, typer.Option(help="training text: corpus:train, file, HF set")] = None,
        steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
        batch_size: Annotated[int | None, typer.Option(help="sequences per micro-batch")] = None,
        seq_len: Annotated[int | None, typer.Option(help="tokens per sequence")] = None,
        grad_accum: Annotated[int | None, typer.Option(help="micro-batches per step")] = None,
        lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
        schedule: Annotated[str | None, typer.Option(help="cosine | step")] = None,
        warmup_steps: Annotated[int | None, typer.Option(help="linear warmup steps")] = None,
        temperature: Annotated[float | None, typer.Option(help="softmax temperature of the logit loss")] = None,
        alpha: Annotated[float | None, typer.Option(help="weight of hard-label CE (the rest goes to KD)")] = None,
        kl: Annotated[str | None, typer.Option(help="forward | reverse | jsd")] = None,
        beta: Annotated[float | None, typer.Option(help="JSD β (0: forward KL, 1: reverse KL)")] = None,
        feature_kind: Annotated[str | None, typer.Option(help="feature loss: mse | cosine")] = None,
        layer_map: Annotated[str | None, typer.Option(help="student:teacher layer pairs, e.g. 0:1,1:3")] = None,
        precision: Annotated[str | None, typer.Option(help="auto | bf16 | fp32")] = None,
        device: Annotated[str | None, typer.Option(help="cpu | cuda")] = None,
        checkpoint_every: Annotated[int | None, typer.Option(help="save training state every N steps")] = None,
        cache_teacher: Annotated[bool, typer.Option(help="run the teacher once into a disk cache")] = False,
        cache_top_k: Annotated[int | None, typer.Option(help="teacher logits kept per token in the cache")] = None,
        seed: Annotated[int | None, typer.Option(help="data seed")] = None,
        resume: Annotated[bool, typer.Option(help="continue from the last training checkpoint")] = False,
        keep_state: Annotated[bool, typer.Option(help="keep OUT.distill-state after success")] = False,
        overwrite: Annotated[bool, typer.Option(help="replace OUT (and its stale training state)")] = False,
    ) -> None:
        """Train STUDENT to imitate TEACHER and write it to OUT (a normal DeepSeek-V3 checkpoint)."""
        from squeeze import api

        r = api.distill(teacher, student, out, loss, recipe, resume, overwrite, show_progress=True,
                        keep_state=keep_state, dataset=dataset, steps=steps, batch_size=batch_size,
                        seq_len=seq_len, grad_accum=grad_accum, lr=lr, schedule=schedule,
                        warmup_steps=warmup_steps, temperature=temperature, alpha=alpha, kl=kl, beta=beta,
                        feature_kind=feature_kind, layer_map=layer_map, precision=precision, device=device,
                        checkpoint_every=checkpoint_every, cache_teacher=cache_teacher or None,
                        cache_top_k=cache_top_k, seed=seed)
        last = r.history[-1]
        console.print(f"distilled {r.steps} steps in {r.seconds:.0f}s ({human_count(r.tokens_per_s)} tok/s), "
                      f"final loss {last['loss']:.3f}, held-out perplexity {r.heldout_ppl:.2f} -> {out}")
