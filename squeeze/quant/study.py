"""The AWQ / SmoothQuant / QAT study on a trained toy: held-out perplexity of each variant.

    python -m squeeze.quant.study TOY_DIR WORKDIR [--quick]

Rows: base; RTN, GPTQ, AWQ at W4A16 g128 and W3A16 g128; W8A8-INT8 by plain RTN vs SmoothQuant (and
SmoothQuant+GPTQ) on a copy of the toy with injected activation outliers; QAT at W4 and W3 from the
RTN start, with the share of the start's perplexity gap to base that QAT closes.

The toy has few activation outliers of its own (W8A8 is close to lossless on it), so the SmoothQuant
rows use `outlier_copy`: a few hidden channels of every input_layernorm / post_attention_layernorm are
multiplied by 64 and the consumers' columns (router included) divided by 64. The float model is
unchanged (a power of two is exact in bf16) but the activations now have the outlier channels that
per-token int8 quantization suffers from, as in real LLMs. Every perplexity is measured by
`QuantizedRuntime` from the written checkpoint (stored integers decoded, dynamic activation
quantization applied), on `corpus:heldout`.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import torch

from squeeze.checkpoint.reader import CheckpointReader
from squeeze.checkpoint.writer import CheckpointWriter
from squeeze.data import load_text, token_windows
from squeeze.model.decoder import build_layer
from squeeze.model.tokenizer import TOKENIZER_FILES, load_tokenizer
from squeeze.quant.folding import inject_outliers
from squeeze.quant.runtime import QuantizedRuntime

OUTLIER_FACTOR = 64.0
N_OUTLIERS = 4


def heldout_windows(ckpt: Path, seq_len: int = 128, max_windows: int | None = None) -> torch.Tensor:
    return token_windows(load_tokenizer(ckpt).encode(load_text("corpus:heldout")).ids, seq_len, max_windows)


def perplexity(ckpt: Path, windows: torch.Tensor) -> float:
    total, count = QuantizedRuntime(ckpt).nll(windows, 16)
    return math.exp(total / count)


def outlier_copy(src: Path, dst: Path, n: int = N_OUTLIERS, factor: float = OUTLIER_FACTOR, seed: int = 0) -> None:
    """Write `src` with `n` outlier channels injected before attention and MoE/MLP in every layer."""
    reader = CheckpointReader(src)
    cfg = reader.config
    channels = torch.randperm(cfg.hidden_size, generator=torch.Generator().manual_seed(seed))[:n]
    if dst.exists():
        shutil.rmtree(dst)
    with CheckpointWriter(dst) as w:
        top = [n_ for n_ in reader.names if not n_.startswith("model.layers.")]
        w.add_many({k: v.to(torch.bfloat16) for k, v in reader.read(top).items()})
        for i in range(cfg.num_hidden_layers):
            prefix = reader.layer_prefix(i)
            layer = build_layer(cfg, i, reader.read(reader.names_with_prefix(prefix)))
            inject_outliers(layer, channels, factor)
            w.add_many({prefix + k: v.to(torch.float32 if reader.stored_dtype(prefix + k) == "F32" else torch.bfloat16)
                        for k, v in layer.state_dict().items()})
        w.set_config(cfg.to_dict())
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                w.add_file(f, src / f)


def main(argv: list[str] | None = None) -> None:
    from squeeze import api

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("toy", type=Path)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--qat-steps", type=int, default=200)
    ap.add_argument("--qat-lr", type=float, default=1e-3)
    ap.add_argument("--max-windows", type=int, default=None, help="held-out windows (default: all)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    a.workdir.mkdir(parents=True, exist_ok=True)
    cal = {"num_samples": a.num_samples, "seq_len": a.seq_len, "overwrite": True}
    windows = heldout_windows(a.toy, 128, a.max_windows)
    rows: list[tuple[str, float, str]] = []

    def run(name: str, src: Path, **kw: object) -> float:
        t = time.perf_counter()
        out = a.workdir / name
        api.quantize(src, out, **{**cal, **kw})  # type: ignore[arg-type]
        p = perplexity(out, windows)
        print(f"  {name:<28} ppl {p:8.3f}  ({time.perf_counter() - t:.0f}s)", flush=True)
        return p

    base = perplexity(a.toy, windows)
    rows.append(("base (bf16)", base, ""))
    print(f"base ppl {base:.3f} on {windows.numel()} held-out tokens", flush=True)
    ppl: dict[str, float] = {}
    for bits in (4, 3):
        for method in ("rtn", "gptq", "awq"):
            key = f"W{bits}A16-g128 {method.upper()}"
            ppl[key] = run(key.replace(" ", "-"), a.toy, method=method, bits=bits, group_size=128)
            rows.append((key, ppl[key], ""))
    for bits in (4, 3):
        for method in ("gptq", "awq"):
            r, m = ppl[f"W{bits}A16-g128 RTN"], ppl[f"W{bits}A16-g128 {method.upper()}"]
            rows.append((f"  W{bits} {method.upper()} vs RTN", m - r, "ppl difference (< 0: better than RTN)"))

    outl = a.workdir / "toy-outliers"
    outlier_copy(a.toy, outl)
    base_o = perplexity(outl, windows)
    rows.append((f"base with {N_OUTLIERS} outlier channels x{OUTLIER_FACTOR:g}", base_o, "same float model"))
    for name, kw in (("W8A8-INT8 RTN (plain)", {"method": "rtn", "scheme": "W8A8_INT8"}),
                     ("W8A8-INT8 SmoothQuant a=0.5", {"method": "smoothquant"}),
                     ("W8A8-INT8 SmoothQuant search", {"method": "smoothquant", "alpha": "search"}),
                     ("W8A8-INT8 SmoothQuant+GPTQ", {"method": "smoothquant+gptq"})):
        rows.append((name + " (outliers)", run(name.replace(" ", "-").replace("=", ""), outl, **kw), ""))
    rows.append(("W8A8-INT8 RTN (original toy)", run("W8A8-RTN-orig", a.toy, method="rtn", scheme="W8A8_INT8"),
                 "no outliers: nothing to fix"))

    for bits in (4, 3):
        start = ppl[f"W{bits}A16-g128 RTN"]
        q = run(f"W{bits}A16-QAT", a.toy, method="qat", bits=bits, group_size=128, start="rtn",
                steps=a.qat_steps, lr=a.qat_lr)
        gap = start - base
        closed = 100.0 * (start - q) / gap if gap > 0 else float("nan")
        rows.append((f"W{bits}A16-g128 QAT (from RTN)", q, f"gap closed {closed:.0f}%"))

    print("\n| variant | held-out ppl | note |\n| --- | ---: | --- |")
    for name, value, note in rows:
        print(f"| {name} | {value:.3f} | {note} |")


if __name__ == "__main__":
    main()
