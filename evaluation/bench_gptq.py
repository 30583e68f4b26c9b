"""GPTQ W4A16 g128: squeeze vs llm-compressor on the same DeepSeek-V3 toy and calibration windows.

Builds a toy DeepSeek-V3 checkpoint (tokenizer trained on the bundled corpus, random or briefly trained
weights), cuts the calibration windows squeeze itself would use (`corpus:calibration`, seed 0), and
runs, alternating A/B/A/B for `--rounds` rounds, each in a fresh child process:

- squeeze: `squeeze.api.quantize(..., method="gptq", bits=4, group_size=128, act_order=True)` (layer by
  layer from disk);
- llm-compressor: `oneshot` with `GPTQModifier(scheme="W4A16", ignore=[lm_head, mlp.gate])`, its
  sequential pipeline, transformers' DeepseekV3ForCausalLM loaded with linearized experts, every expert
  calibrated on every token (as squeeze does), the same windows as a tokenized dataset.

Both use the same column order: llm-compressor's default "static" activation ordering (groups fixed in the
original column order, columns swept by decreasing Hessian diagonal) is squeeze's `act_order`;
`--act-order none` compares both without it.

Each child reports its wall time (model load to written output; imports excluded) and peak RSS
(VmHWM). Then squeeze's runtime computes the held-out perplexity of the base model and both outputs
(squeeze reads compressed-tensors checkpoints), and one table prints the ratios.

llm-compressor must live in its own virtual environment (it pins its own transformers):

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    python -m squeeze.evaluation.bench_gptq [--layers 8 --hidden 512 --experts 16 --llmc-python /tmp/llmc/bin/python]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from squeeze.model.toy import ToySpec

LLMC_VERSION_WANTED = "0.14"

# Both children: same thread count, wall time from model load to written output, VmHWM at the end.
_SQUEEZE_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
from squeeze import api
import compressed_tensors  # squeeze imports it on first export; imports are excluded from both timings
src, out, n, L, act_order = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[6] == "static"
t = time.perf_counter()
r = api.quantize(src, out, method="gptq", bits=4, group_size=128, act_order=act_order, num_samples=n, seq_len=L,
                 overwrite=True)
wall = time.perf_counter() - t
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": wall, "peak_rss_mib": int(hwm.split()[1]) / 1024, "layers": len(r.layers),
                  "calibration_seconds": r.calibration_seconds, "method_seconds": r.method_seconds}))
"""

# Runs under the llm-compressor venv's python: nothing from squeeze is importable there.
_LLMC_CHILD = r"""
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(int(sys.argv[4]))
from datasets import Dataset
from transformers import AutoModelForCausalLM
import llmcompressor
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
src, out, ids_file, dtype, actorder = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5], sys.argv[6]
ids = torch.load(ids_file, weights_only=True)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
t = time.perf_counter()
# oneshot linearizes the fused experts itself after loading (`load_quantizable_moe` would do it at load
# time, but its class patching imports every transformers module, which needs torchvision: not installable
# here for torch 2.13 CPU)
model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp\\.gate$"],
                      actorder=None if actorder == "none" else actorder)
oneshot(model=model, dataset=ds, recipe=recipe, pipeline="sequential", num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1], shuffle_calibration_samples=False, moe_calibrate_all_experts=True)
model.save_pretrained(out, save_compressed=True)
wall = time.perf_counter() - t
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": wall, "peak_rss_mib": int(hwm.split()[1]) / 1024,
                  "layers": model.config.num_hidden_layers, "version": llmcompressor.__version__}))
"""


def toy_spec(layers: int, hidden: int, experts: int, moe_inter: int) -> ToySpec:
    heads = max(2, hidden // 64)
    return ToySpec(layers=layers, dense_layers=1, hidden=hidden, heads=heads, experts=experts, top_k=2,
                   n_group=4, topk_group=2, moe_inter=moe_inter, inter=4 * moe_inter, vocab=4096,
                   q_lora_rank=max(128, hidden // 2), kv_lora_rank=max(128, hidden // 4), qk_nope_head_dim=32,
                   qk_rope_head_dim=32, v_head_dim=32)


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the child's output")


def run_child(argv: list[str], log: Path, pythonpath: str | None = None) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"child failed (rc {proc.returncode}, full log {log}):\n{tail}")
    return _last_json(proc.stdout)


def llmc_status(python: str) -> str | None:
    """None when `python` can import llm-compressor, else why not (one line)."""
    if not Path(python).exists():
        return f"no python at {python}"
    proc = subprocess.run([python, "-c", "import llmcompressor; print(llmcompressor.__version__)"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"{python} cannot import llmcompressor: {proc.stderr.strip().splitlines()[-1:]}"
    v = proc.stdout.strip().splitlines()[-1]
    if not v.startswith(LLMC_VERSION_WANTED):
        print(f"note: llm-compressor {v} (the target names {LLMC_VERSION_WANTED})")
    return None


def perplexity(checkpoint: Path, windows: torch.Tensor) -> float:
    from squeeze.quant.runtime import QuantizedRuntime

    total, count = QuantizedRuntime(checkpoint).nll(windows, 8)
    return math.exp(total / count)


def layer_error_ratios(model: Path, ours: Path, theirs: Path, calib: torch.Tensor, layers: int = 3,
                       batch: int = 8) -> list[float]:
    """GPTQ's own objective, per Linear of the first `layers` layers: the relative output error
    ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² of `ours` over that of `theirs`, on the unquantized model's fp32 activations of
    the calibration windows. End-to-end perplexity of two equally good quantizations differs by noise;
    this compares what GPTQ minimises, Linear by Linear."""
    from squeeze.checkpoint import CheckpointReader
    from squeeze.model.decoder import build_layer
    from squeeze.model.rope import RotaryTable
    from squeeze.quant.calibration import LayerCalibration, Target, output_error

    base, a, b = CheckpointReader(model), CheckpointReader(ours), CheckpointReader(theirs)
    rope = RotaryTable(base.config)
    embed = base.read_one("model.embed_tokens.weight")
    hs = [torch.nn.functional.embedding(x, embed) for x in calib.split(batch)]
    ratios = []
    for i in range(min(layers, base.config.num_hidden_layers)):
        layer = build_layer(base.config, i, base.read(base.names_with_prefix(f"model.layers.{i}."))).eval()
        targets = [Target(f"model.layers.{i}.{n}", n, m, None, "gptq") for n, m in layer.named_modules()
                   if isinstance(m, torch.nn.Linear) and f"model.layers.{i}.{n}.weight_packed" in a]
        lc = LayerCalibration(i, hs, lambda n: rope.get(0, n))
        stats = lc.collect_hessians(layer, targets)
        for t in targets:
            w = t.module.weight.data
            ea = output_error(w, a.read_one(t.name + ".weight"), stats[t.name])
            eb = output_error(w, b.read_one(t.name + ".weight"), stats[t.name])
            ratios.append(ea / eb)
        hs = lc.run(layer, observe_all_experts=False)
    return ratios


def build(work: Path, spec: ToySpec, train_steps: int, num_samples: int, seq_len: int,
          heldout_windows: int) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """The toy checkpoint, the calibration windows squeeze uses for it, and held-out windows."""
    from squeeze.data import load_text, token_windows
    from squeeze.model.tokenizer import load_tokenizer
    from squeeze.model.toy import make_toy
    from squeeze.quant.pipeline import calibration_batches
    from squeeze.recipe import recipe_from_flags

    model = work / "model"
    if not (model / "config.json").exists():
        make_toy(model, spec, train_steps=train_steps, max_shard_bytes=256 * 1024**2, overwrite=True)
    rec = recipe_from_flags("gptq", 4, 128)
    rec.calibration.num_samples, rec.calibration.seq_len = num_samples, seq_len
    calib = torch.cat(calibration_batches(model, rec))
    tok = load_tokenizer(model)
    heldout = token_windows(tok.encode(load_text("corpus:heldout")).ids, 128, heldout_windows)
    return model, calib, heldout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--moe-inter", type=int, default=512)
    p.add_argument("--train-steps", type=int, default=0, help="train the toy first (0: random weights)")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2, help="A/B rounds (squeeze, llm-compressor alternating)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--heldout-windows", type=int, default=64, help="held-out windows of 128 tokens for ppl")
    p.add_argument("--llmc-python", default="/tmp/llmc/bin/python",
                   help="python of a venv with llmcompressor installed")
    p.add_argument("--llmc-dtype", default="bfloat16", help="dtype llm-compressor loads the model in")
    p.add_argument("--act-order", choices=["static", "none"], default="static",
                   help="GPTQ column order for both (llm-compressor's default is static activation ordering; "
                        "squeeze's act_order is the same scheme: groups fixed in the original order)")
    p.add_argument("--skip-llmc", action="store_true", help="time squeeze only")
    p.add_argument("--squeeze-src", default=None,
                   help="directory holding another `squeeze` package to time instead (e.g. a copy at an older commit)")
    p.add_argument("--baseline-src", default=None,
                   help="also time the `squeeze` package in this directory as 'squeeze-base' (before/after in one run)")
    p.add_argument("--workdir", default=None, help="keep the toy and outputs here (reused if present)")
    a = p.parse_args()

    llmc_why = "skipped (--skip-llmc)" if a.skip_llmc else llmc_status(a.llmc_python)
    if llmc_why is not None:
        print(f"llm-compressor: NOT RUN: {llmc_why}. Install: python -m venv /tmp/llmc && "
              "/tmp/llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1", flush=True)

    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory()
        work = Path(tmp.name)
    else:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        spec = toy_spec(a.layers, a.hidden, a.experts, a.moe_inter)
        model, calib, heldout = build(work, spec, a.train_steps, a.num_samples, a.seq_len, a.heldout_windows)
        ids_file = work / "calibration_ids.pt"
        torch.save(calib, ids_file)
        print(f"toy: {a.layers} layers, hidden {a.hidden}, {a.experts} experts x {a.moe_inter}, "
              f"{f'trained {a.train_steps} steps' if a.train_steps else 'random weights'}; calibration "
              f"{calib.shape[0]} x {calib.shape[1]} tokens from corpus:calibration; {a.threads} threads", flush=True)

        results: dict[str, list[dict]] = {"squeeze": [], "llm-compressor": []}
        if a.baseline_src:
            results["squeeze-base"] = []
        srcs = {"squeeze": a.squeeze_src, "squeeze-base": a.baseline_src}
        for r in range(a.rounds):
            for name in list(results):
                out = work / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                if name.startswith("squeeze"):
                    argv = [sys.executable, "-c", _SQUEEZE_CHILD, str(model), str(out), str(a.num_samples),
                            str(a.seq_len), str(a.threads), a.act_order]
                elif llmc_why is None:
                    argv = [a.llmc_python, "-c", _LLMC_CHILD, str(model), str(out), str(ids_file),
                            str(a.threads), a.llmc_dtype, a.act_order]
                else:
                    continue
                try:
                    res = run_child(argv, work / f"{name}-round{r}.log",
                                    srcs.get(name))
                except RuntimeError as e:
                    if name.startswith("squeeze"):
                        raise
                    llmc_why = f"failed on this model: {e}"
                    print(f"llm-compressor: {llmc_why}", flush=True)
                    continue
                results[name].append(res)
                print(f"round {r + 1} {name:>15}: {res['seconds']:8.1f} s  {res['peak_rss_mib']:7.0f} MiB peak",
                      flush=True)

        ppl = {"base (bf16)": perplexity(model, heldout)}
        for name in results:
            if results[name]:
                ppl[name] = perplexity(work / f"out-{name}", heldout)

        print(f"\nGPTQ W4A16 g128 (act-order {a.act_order}), {a.layers}-layer DeepSeek-V3 toy "
              f"(hidden {a.hidden}, {a.experts} experts), "
              f"{calib.shape[0]}x{calib.shape[1]} calibration tokens, {a.rounds} alternating rounds, "
              f"median; ppl on {heldout.shape[0]}x{heldout.shape[1]} held-out tokens")
        print(f"{'':>15} {'s/layer':>8} {'total s':>8} {'peak MiB':>9} {'ppl':>10}")
        print(f"{'base (bf16)':>15} {'':>8} {'':>8} {'':>9} {ppl['base (bf16)']:>10.3f}")
        summary: dict[str, dict[str, float]] = {}
        for name, runs in results.items():
            if not runs:
                continue
            sec = statistics.median(x["seconds"] for x in runs)
            peak = statistics.median(x["peak_rss_mib"] for x in runs)
            summary[name] = {"seconds": sec, "peak": peak, "ppl": ppl[name]}
            print(f"{name:>15} {sec / a.layers:>8.2f} {sec:>8.1f} {peak:>9.0f} {ppl[name]:>10.3f}")
        if "squeeze" in summary and "llm-compressor" in summary:
            s, lc = summary["squeeze"], summary["llm-compressor"]
            print(f"{'ratio sq/llmc':>15} {s['seconds'] / lc['seconds']:>8.2f} {s['seconds'] / lc['seconds']:>8.2f} "
                  f"{s['peak'] / lc['peak']:>9.2f} {s['ppl'] / lc['ppl']:>10.4f}")
            if "squeeze-base" in summary:
                b = summary["squeeze-base"]
                r = b["seconds"] / lc["seconds"]
                print(f"{'ratio base/llmc':>15} {r:>8.2f} {r:>8.2f} "
                      f"{b['peak'] / lc['peak']:>9.2f} {b['ppl'] / lc['ppl']:>10.4f}")
                print(f"{'speedup base/sq':>15} {b['seconds'] / s['seconds']:>8.2f}")
            print(f"target: wall ratio <= 0.50 -> {'MET' if s['seconds'] <= 0.5 * lc['seconds'] else 'not met'}; "
                  f"ppl squeeze <= llm-compressor -> {'yes' if s['ppl'] <= lc['ppl'] else 'no'}")
            print("per round (s): " + ", ".join(
                f"{n} {[round(x['seconds'], 1) for x in results[n]]}" for n in results))
            r = sorted(layer_error_ratios(model, work / "out-squeeze", work / "out-llm-compressor", calib))
            print(f"GPTQ output error per Linear, squeeze / llm-compressor, first 3 layers ({len(r)} Linears): "
                  f"median {statistics.median(r):.3f}, min {r[0]:.3f}, max {r[-1]:.3f}; "
                  f"squeeze lower on {sum(x < 1 for x in r)}")
        else:
            print(f"llm-compressor: not measured ({llmc_why})")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
