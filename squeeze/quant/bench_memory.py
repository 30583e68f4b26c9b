"""Peak memory of `squeeze quantize` is flat in depth.

Same measurement as `squeeze.evaluation.bench_memory` (random DeepSeek-V3 toys 4 and 16 layers deep,
same layer size, each run in a fresh process, VmHWM), but running the GPTQ W4A16 pipeline, which holds
one layer, its input Hessians and the calibration activations at a time.

    python -m squeeze.quant.bench_memory [--hidden 512 --experts 16 --moe-inter 512 --method gptq]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from squeeze.evaluation.bench_memory import depth_spec
from squeeze.model.toy import write_random_toy

_CHILD = """
import json, sys, time, torch
from squeeze.quant.pipeline import quantize_checkpoint
from squeeze.recipe import recipe_from_flags, Calibration
torch.manual_seed(0)
src, out, method, vocab = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ids = torch.randint(0, vocab, (8, 128))
t = time.perf_counter()
r = quantize_checkpoint(src, out, recipe_from_flags(method, 4, calibration=Calibration(batch_size=4)),
                        show_progress=False, max_shard_bytes=32 * 1024**2, calibration_ids=ids)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mib": int(hwm.split()[1]) / 1024, "seconds": time.perf_counter() - t,
                  "seconds_per_layer": (time.perf_counter() - t) / len(r.layers)}))
"""


def run_child(src: Path, out: Path, method: str, vocab: int) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), method, str(vocab)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(hidden: int = 512, experts: int = 16, moe_inter: int = 512, method: str = "gptq",
            depths: tuple[int, int] = (4, 16)) -> dict[str, float]:
    """Peak RSS (MiB) and seconds per layer for each depth, and the deep/shallow peak ratio."""
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for depth in depths:
            spec = depth_spec(depth, hidden, experts, moe_inter)
            path = Path(tmp) / f"d{depth}"
            write_random_toy(path, spec, max_shard_bytes=64 * 1024**2)
            results[f"disk_mib_{depth}"] = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1024**2
            r = run_child(path, Path(tmp) / f"q{depth}", method, spec.vocab)
            results[f"peak_rss_mib_{depth}"] = r["peak_rss_mib"]
            results[f"seconds_per_layer_{depth}"] = r["seconds_per_layer"]
    results["ratio"] = results[f"peak_rss_mib_{depths[1]}"] / results[f"peak_rss_mib_{depths[0]}"]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--moe-inter", type=int, default=512)
    p.add_argument("--method", default="gptq")
    a = p.parse_args()
    r = measure(a.hidden, a.experts, a.moe_inter, a.method)
    print(f"{'layers':>6} {'checkpoint MiB':>15} {'peak RSS MiB':>13} {'s/layer':>8}")
    for d in (4, 16):
        print(f"{d:>6} {r[f'disk_mib_{d}']:>15.0f} {r[f'peak_rss_mib_{d}']:>13.0f} {r[f'seconds_per_layer_{d}']:>8.2f}")
    print(f"peak RSS ratio 16/4 layers: {r['ratio']:.2f} (target <= 1.30)")


if __name__ == "__main__":
    main()
