"""The `squeeze` command line: thin wrappers over `squeeze.api`, rendered with rich.

Every command turns a `SqueezeError` into one red line and exit code 1, and Ctrl-C into exit 130;
writers clean up after themselves, so neither leaves partial output behind.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from squeeze import api
from squeeze.commands import distill, evaluate, quantize
from squeeze.console import console, handle_errors, human_bytes, human_count, make_progress

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress DeepSeek-format Mixture-of-Experts models.")


# ---- toy ------------------------------------------------------------------------------------
@app.command()
@handle_errors
def toy(
    out: Annotated[Path, typer.Argument(help="Directory to create.")],
    layers: Annotated[int, typer.Option(help="Decoder layers.")] = 4,
    dense_layers: Annotated[int, typer.Option(help="first_k_dense_replace: leading dense layers.")] = 1,
    hidden: Annotated[int, typer.Option(help="hidden_size.")] = 256,
    experts: Annotated[int, typer.Option(help="n_routed_experts.")] = 8,
    top_k: Annotated[int, typer.Option(help="num_experts_per_tok.")] = 2,
    n_group: Annotated[int, typer.Option(help="Expert groups for group-limited routing.")] = 4,
    topk_group: Annotated[int, typer.Option(help="Groups kept per token.")] = 2,
    vocab: Annotated[int, typer.Option(help="BPE vocabulary size.")] = 4096,
    fp8: Annotated[bool, typer.Option("--fp8", help="Store Linear weights as DeepSeek block-FP8.")] = False,
    train_steps: Annotated[int, typer.Option(help="Train on the bundled corpus for N steps (0: random).")] = 0,
    seed: int = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Write the built-in toy DeepSeek-V3 MoE checkpoint (optionally trained)."""
    spec = api.ToySpec(layers=layers, dense_layers=dense_layers, hidden=hidden, experts=experts, top_k=top_k,
                       n_group=n_group, topk_group=topk_group, vocab=vocab)
    if train_steps:
        with make_progress() as progress:
            task = progress.add_task("training toy", total=train_steps, info="")
            result = api.make_toy(out, spec, train_steps, fp8, seed, overwrite=overwrite,
                                  on_step=lambda s, loss: progress.update(task, completed=s + 1,
                                                                          info=f"loss {loss:.3f}"))
        assert result is not None
        console.print(
            f"trained {result.steps} steps in {result.seconds:.0f}s: held-out perplexity "
            f"[bold]{result.heldout_ppl:.1f}[/] (uniform baseline {result.uniform_ppl:.0f}); "
            f"expert load CV {result.expert_load_cv:.2f}"
        )
    else:
        api.make_toy(out, spec, 0, fp8, seed, overwrite=overwrite)
    console.print(f"wrote {'block-FP8' if fp8 else 'bf16'} DeepSeek-V3 toy checkpoint to [bold]{out}[/]")


# ---- inspect --------------------------------------------------------------------------------
@app.command()
@handle_errors
def inspect(checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")]) -> None:
    """Summarise a checkpoint: architecture, parameters, storage formats, size on disk."""
    s = api.inspect(checkpoint)
    c = s.config
    arch = Table(title=f"{checkpoint}  ({c.model_type})", show_header=False, title_justify="left")
    arch.add_column(style="bold")
    arch.add_column()
    moe = c.moe_layers
    dense = [i for i in range(c.num_hidden_layers) if i not in moe]
    arch.add_row("layers", f"{c.num_hidden_layers} ({len(dense)} dense, {len(moe)} MoE)")
    arch.add_row("hidden / vocab", f"{c.hidden_size} / {c.vocab_size}")
    arch.add_row("attention", f"MLA, {c.num_attention_heads} heads, q_lora {c.q_lora_rank}, kv_lora {c.kv_lora_rank}, "
                 f"qk {c.qk_nope_head_dim}+{c.qk_rope_head_dim} (rope), v {c.v_head_dim}")
    if c.n_routed_experts:
        arch.add_row("experts", f"{c.n_routed_experts} routed (top-{c.num_experts_per_tok}, {c.n_group} groups, "
                     f"top-{c.topk_group} groups) + {c.n_shared_experts or 0} shared, width {c.moe_intermediate_size}")
        arch.add_row("router", f"{c.scoring_func} / {c.topk_method}, scaling {c.routed_scaling_factor}, "
                     f"normalised {c.norm_topk_prob}")
    rs = c.rope_scaling or {}
    arch.add_row("rope", f"theta {c.rope_theta:g}" + (f", yarn x{rs.get('factor')}" if rs else ""))
    arch.add_row("parameters",
                 f"{human_count(s.total_params)} total, {human_count(s.active_params)} active per token")
    arch.add_row("on disk", f"{human_bytes(s.disk_bytes)} in {s.shards} shard(s)")
    console.print(arch)
    fmt = Table(title="storage", title_justify="left")
    for col in ("format", "tensors", "parameters", "bytes"):
        fmt.add_column(col, justify="right" if col != "format" else "left")
    for name, st in sorted(s.formats.items(), key=lambda kv: -kv[1].bytes):
        fmt.add_row(name, str(st.tensors), human_count(st.params), human_bytes(st.bytes))
    console.print(fmt)


# ---- run ------------------------------------------------------------------------------------
@app.command()
@handle_errors
def perplexity(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    text: Annotated[str, typer.Option(help="Text file, corpus:heldout|calibration|train, or a cached HF dataset.")]
    = "corpus:heldout",
    seq_len: Annotated[int, typer.Option(help="Window length in tokens.")] = 128,
    max_windows: Annotated[int, typer.Option(help="Use at most N windows (0: all).")] = 0,
    batch_size: int = 8,
) -> None:
    """Perplexity of CHECKPOINT on a text, run layer by layer from disk."""
    with make_progress() as progress:
        task = progress.add_task("layers", total=None, info="")
        result = api.perplexity(checkpoint, text, seq_len, max_windows or None, batch_size,
                                on_layer=lambda i, n: progress.update(task, completed=i + 1, total=n, info=""))
    console.print(f"perplexity [bold]{result.perplexity:.2f}[/] over {result.tokens} tokens "
                  f"({result.windows} windows of {seq_len}) in {result.seconds:.1f}s")


@app.command()
@handle_errors
def generate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    max_new_tokens: int = 40,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> None:
    """Continue PROMPT with CHECKPOINT (MLA latent cache, layers from disk)."""
    console.print(f"[bold]{prompt}[/]", end="")
    for piece in api.generate(checkpoint, prompt, max_new_tokens, temperature, top_k, seed):
        console.print(piece, end="", highlight=False, markup=False)
        sys.stdout.flush()
    console.print()


@app.command()
@handle_errors
def demo(
    out: Annotated[Path, typer.Argument(help="Working directory for the demo's checkpoints.")] = Path("runs/demo"),
    train_steps: int = 500,
    eval_limit: Annotated[int, typer.Option(help="Documents per evaluation task.")] = 50,
) -> None:
    """The main job on the toy: make and train a MoE, quantize it two ways, and score what survived.

    Each step is the command a user would type (shown before it runs), and finished steps are reused,
    so an interrupted demo picks up where it stopped.
    """
    out.mkdir(parents=True, exist_ok=True)
    base = out / "toy"
    w4, fp8 = out / "toy-w4a16-gptq", out / "toy-fp8-block"
    if not base.exists():
        _run("toy", str(base), "--train-steps", str(train_steps))
    _run("inspect", str(base))
    _run("perplexity", str(base))
    _run("generate", str(base), "And God said", "--max-new-tokens", "30")
    if not w4.exists():
        _run("quantize", str(base), str(w4), "--method", "gptq", "--bits", "4", "--group-size", "128")
    if not fp8.exists():
        _run("quantize", str(base), str(fp8), "--method", "fp8-block")
    _run("eval", str(base), str(w4), str(fp8), "--names", "BF16,W4A16-GPTQ,FP8-block", "--limit",
         str(eval_limit), "--out", str(out / "eval"))


def _run(*argv: str) -> None:
    """Run a squeeze command in-process exactly as typed on the command line; stop the demo if it fails."""
    console.rule(f"[bold]squeeze {' '.join(argv)}")
    code = typer.main.get_command(app).main(list(argv), prog_name="squeeze", standalone_mode=False)
    if code:
        raise typer.Exit(code)


# Commands of the other subsystems live in squeeze/commands/, one module each.
for _module in (quantize, distill, evaluate):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
