"""Peak memory of layer-by-layer execution is flat in depth.

Builds two random DeepSeek-V3 checkpoints with the same layer size, 4 and 16 layers deep, and runs a
perplexity pass over each in a fresh process, reporting peak RSS. Loading whole models would make the
16-layer run need about 4x the layer memory of the 4-layer one; streaming keeps the ratio near 1.

    python -m squeeze.evaluation.bench_memory [--hidden 1024 --experts 16 --moe-inter 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from squeeze.model.toy import ToySpec, write_random_toy

# VmHWM is the peak RSS of this process's own address space; getrusage's ru_maxrss would also count
# the parent's RSS at fork time (Linux keeps it across execve), i.e. the model-building parent.
_CHILD = """
import json, sys, torch
from squeeze.model.runtime import LayerwiseModel
torch.manual_seed(0)
m = LayerwiseModel(sys.argv[1])
ids = torch.randint(0, m.config.vocab_size, (8, 128))
m.nll(ids, batch_size=4)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mib": int(hwm.split()[1]) / 1024}))
"""


def depth_spec(layers: int, hidden: int, experts: int, moe_inter: int) -> ToySpec:
    """The toy of a depth comparison: only `layers` varies between the two checkpoints compared."""
    return ToySpec(layers=layers, dense_layers=1, hidden=hidden, heads=8, experts=experts, top_k=2, n_group=4,
                   topk_group=2, moe_inter=moe_inter, inter=4 * moe_inter, vocab=4096, q_lora_rank=hidden // 2,
                   kv_lora_rank=hidden // 4)


def peak_rss_mib(checkpoint: Path) -> float:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(checkpoint)], capture_output=True, text=True,
                         check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"])


def measure(hidden: int = 1024, experts: int = 16, moe_inter: int = 512,
            depths: tuple[int, int] = (4, 16)) -> dict[str, float]:
    """Peak RSS (MiB) for each depth and the deep/shallow ratio."""
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for depth in depths:
            spec = depth_spec(depth, hidden, experts, moe_inter)
            path = Path(tmp) / f"d{depth}"
            write_random_toy(path, spec, max_shard_bytes=256 * 1024**2)
            size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1024**2
            results[f"disk_mib_{depth}"] = size
            results[f"peak_rss_mib_{depth}"] = peak_rss_mib(path)
    results["ratio"] = results[f"peak_rss_mib_{depths[1]}"] / results[f"peak_rss_mib_{depths[0]}"]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--moe-inter", type=int, default=512)
    a = p.parse_args()
    r = measure(a.hidden, a.experts, a.moe_inter)
    print(f"{'layers':>6} {'checkpoint MiB':>15} {'peak RSS MiB':>13}")
    for d in (4, 16):
        print(f"{d:>6} {r[f'disk_mib_{d}']:>15.0f} {r[f'peak_rss_mib_{d}']:>13.0f}")
    print(f"peak RSS ratio 16/4 layers: {r['ratio']:.2f} (target <= 1.30)")


if __name__ == "__main__":
    main()
