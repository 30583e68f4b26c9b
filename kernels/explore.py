"""Time every launch strategy of one op on DeepSeek-V3 shapes (needs a CUDA GPU); a tuning aid.

    python -m squeeze.kernels.explore [--only w4,w4main,w4big,w4gemv,fp8,fp8big]

Why: the run-time tuner keeps only the winner; picking the candidate lists (and seeing how far each
strategy is from the floor) needs every candidate's time, each checked against the reference first.
Times are CUDA-graph replay medians over rotating weight copies (see bench.bench_graph).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from . import fp8_block, w4a16
from .bench import bench_graph, copies, fp8_weight, int4_weight, rel
from .reference import linear_fp8_block_ref, linear_wq_ref


def _row(name: str, cfg: object, err: float, t: float, t_ref: float) -> None:
    print(f"{name:28s} {t:8.1f} us  x{t_ref / t:5.2f}  err {err:.1e}  {cfg}", flush=True)


# (block_n, warps, sub-blocks per step, stages) of the M = 1 int4 GEMV beyond the tuner's list: the
# grid the 2026-11-27 sweeps covered (BENCH_H100.md), for re-checking the candidates on a new GPU.
GEMV_GRID = [(bn, w, ng, st) for bn, w, ng in ((8, 2, 8), (16, 2, 8), (16, 4, 8), (32, 2, 4), (32, 4, 4), (64, 4, 2),
                                               (16, 2, 4), (8, 1, 8)) for st in (2, 3, 4)]


def explore_w4(n: int, k: int, m: int, cands: list[w4a16.WqConfig] | None = None) -> None:
    wb = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies(2 * n * k))]
    w4 = [int4_weight(n, k) for _ in range(copies(n * k // 2))]
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    t_ref = bench_graph([lambda w=w: F.linear(x, w) for w in wb])
    print(f"--- W4A16 N={n} K={k} M={m}: cuBLAS {t_ref:.1f} us", flush=True)
    ref = linear_wq_ref(x, *w4[0], None, 128)
    for cfg in cands or w4a16._candidates(m, False):
        try:
            err = rel(w4a16.launch_wq(x, *w4[0], None, 128, cfg), ref)
            t = bench_graph([lambda p=p, s=s, c=cfg: w4a16.launch_wq(x, p, s, None, 128, c) for p, s in w4])
        except Exception as e:  # noqa: BLE001 - report and go on: one bad tile must not end the sweep
            print(f"w4 {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        _row(f"w4 M={m}", cfg, err, t, t_ref)


def explore_fp8(n: int, k: int, m: int) -> None:
    wb = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies(2 * n * k))]
    f8 = [fp8_weight(n, k) for _ in range(copies(n * k))]
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    t_ref = bench_graph([lambda w=w: F.linear(x, w) for w in wb])
    print(f"--- FP8 N={n} K={k} M={m}: cuBLAS {t_ref:.1f} us", flush=True)
    ref = linear_fp8_block_ref(x, *f8[0])
    for cfg in fp8_block._candidates(m, False):
        try:
            err = rel(fp8_block.launch_fp8_block(x, *f8[0], cfg), ref)
            t = bench_graph([lambda f=f, s=s, c=cfg: fp8_block.launch_fp8_block(x, f, s, c) for f, s in f8])
        except Exception as e:  # noqa: BLE001
            print(f"fp8 {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        _row(f"fp8 M={m}", cfg, err, t, t_ref)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="w4,fp8,fp8big")
    args = ap.parse_args()
    os.environ["SQUEEZE_KERNELS_NO_TUNE"] = "1"
    parts = args.only.split(",")
    print(torch.cuda.get_device_name(), flush=True)
    if "w4" in parts:
        for n, k in [(18432, 7168), (2048, 7168)]:
            for m in (1, 16):
                explore_w4(n, k, m)
    if "w4main" in parts:  # the target shape only
        for m in (1, 16):
            explore_w4(18432, 7168, m)
    if "fp8" in parts:
        for n, k in [(18432, 7168), (2048, 7168)]:
            explore_fp8(n, k, 1)
    if "fp8big" in parts:
        explore_fp8(18432, 7168, 4096)
    if "w4gemv" in parts:  # the M = 1 GEMV over a wider config grid, every DeepSeek shape
        grid = [w4a16.WqConfig(1, bn, 128, w, st, gemv=True, ng=ng) for bn, w, ng, st in GEMV_GRID]
        for n, k in [(18432, 7168), (24576, 1536), (7168, 2048), (2048, 7168)]:
            explore_w4(n, k, 1, grid)
    if "w4big" in parts:
        explore_w4(18432, 7168, 4096)


if __name__ == "__main__":
    main()
