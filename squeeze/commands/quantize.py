"""`squeeze quantize`: RTN, GPTQ, AWQ, SmoothQuant, block FP8 (layer-by-layer pipeline) and QAT (`squeeze.quant`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from squeeze.console import console, handle_errors, human_bytes


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the squeeze CLI."""

    @app.command("quantize")
    @handle_errors
    def quantize(
        model: Annotated[Path, typer.Argument(help="input checkpoint (bf16 or DeepSeek FP8-block)")],
        out: Annotated[Path, typer.Argument(help="output directory (must not exist)")],
        method: Annotated[str, typer.Option(
            help="rtn | gptq | awq | smoothquant | smoothquant+gptq | qat | fp8-block")] = "gptq",
        bits: Annotated[int | None, typer.Option(help="weight bits: 4 or 8 (3 for studies; smoothquant: 8)")] = None,
        group_size: Annotated[int | None, typer.Option(help="32 | 64 | 128 | -1 (per channel)")] = None,
        symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric")] = True,
        act_order: Annotated[bool, typer.Option("--act-order", help="GPTQ: columns by decreasing Hessian")] = False,
        scheme: Annotated[str | None, typer.Option(help="preset: W4A16, W8A16, W8A8_INT8, W8A8_FP8, FP8_BLOCK")] = None,
        dataset: Annotated[str | None, typer.Option(help="calibration text: file, corpus:calibration, HF name")] = None,
        num_samples: Annotated[int | None, typer.Option(help="calibration windows")] = None,
        seq_len: Annotated[int | None, typer.Option(help="tokens per calibration window")] = None,
        ignore: Annotated[list[str] | None, typer.Option(help="regex of modules to keep unquantized")] = None,
        recipe: Annotated[Path | None, typer.Option(help="recipe YAML (rules of targets/scheme/method)")] = None,
        overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
        alpha: Annotated[str | None, typer.Option(help="smoothquant: migration strength in [0, 1] or 'search'")] = None,
        steps: Annotated[int | None, typer.Option(help="qat: training steps")] = None,
        lr: Annotated[float | None, typer.Option(help="qat: learning rate")] = None,
        start: Annotated[str | None, typer.Option(help="qat: PTQ start, rtn | gptq")] = None,
    ) -> None:
        """Quantize MODEL into OUT (compressed-tensors, or DeepSeek's FP8 layout for fp8-block)."""
        from squeeze import api

        report = api.quantize(model, out, method, bits, group_size, symmetric, act_order, scheme, dataset,
                              num_samples, seq_len, ignore, recipe, overwrite, show_progress=True,
                              alpha=alpha, steps=steps, lr=lr, start=start)
        table = Table(title=f"quantized {report.quantized_modules} Linear modules -> {out} ({report.layout})")
        for col in ("layer", "seconds", "mean rel. error", "max rel. error"):
            table.add_column(col, justify="right")
        for r in report.layers:
            table.add_row(str(r.layer), f"{r.seconds:.1f}", f"{r.mean_error:.2e}", f"{r.max_error:.2e}")
        console.print(table)
        for name, secs in report.method_seconds.items():
            console.print(f"method [bold]{name}[/]: {secs:.1f}s")
        console.print(f"calibration {report.calibration_tokens} tokens, {report.calibration_seconds:.1f}s; "
                      f"total {report.total_seconds:.1f}s; peak memory {human_bytes(report.peak_rss_bytes)}")
        qat = getattr(report, "qat", None)
        if qat:
            console.print(f"qat: {qat['steps']} steps from {qat['start']}, loss {qat['first_loss']:.3f} -> "
                          f"{qat['last_loss']:.3f}")
        cov = report.expert_coverage()
        if cov:
            console.print(f"expert coverage (routed tokens per expert): min {cov['min']:.0f}, "
                          f"median {cov['median']:.0f}, max {cov['max']:.0f}")
