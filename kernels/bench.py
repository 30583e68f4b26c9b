"""Benchmark the kernels against cuBLAS bf16 and a per-expert torch loop (needs a CUDA GPU).

    python -m squeeze.kernels.bench [--section linear|moe|all] [--out FILE.md]

It first checks every kernel against the torch reference on the GPU (and stops if one is off),
then times. Linear layers: median of CUDA-graph replays (GPU time without Python launch cost,
which is ~50 µs per launch on the lent VM), rotating over enough weight copies to defeat L2, for
ours and cuBLAS alike. MoE: ``triton.testing.do_bench`` medians of eager calls for both ours and
the per-expert torch loop (the loop syncs with the host, so it cannot be graphed), plus our graph
time. Ratios are speed-ups: baseline time / ours (> 1 is faster). The floor column is the larger
of bytes / copy bandwidth and flops / matmul rate, both measured on this device at start (copy: a
1 GiB device-to-device copy, bytes read + written; rate: an 8192^3 bf16 product, doubled for fp8
and int8).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.testing

from . import _tuning
from .fp8_block import linear_fp8_block
from .moe import moe_experts
from .reference import linear_fp8_block_ref, linear_w8a8_ref, linear_wq_ref, moe_experts_ref
from .w4a16 import linear_wq
from .w8a8 import linear_w8a8

SHAPES = [(2048, 7168), (7168, 2048), (18432, 7168), (24576, 1536)]
MS = [1, 16, 128, 1024, 4096]
MOE_TOKENS = [1, 16, 64, 256, 512]
E, TOPK, HIDDEN, INTER = 256, 8, 7168, 2048


def bench(fn: Callable[[], object]) -> float:
    """Median microseconds (do_bench flushes L2 between runs)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def bench_graph(fns: list[Callable[[], object]], replays: int = 30) -> float:
    """Median microseconds per call of one CUDA-graph replay running every fn once, in order.

    A graph removes the CPU launch cost (large on the lent VM, and what a serving engine's decode
    step pays nothing for), so the numbers are GPU time. The fns use distinct weight copies (see
    ``copies``) so that no weight stays in the 50 MB L2 between calls.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:  # tune and compile outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return sorted(times)[len(times) // 2]


def copies(nbytes: int) -> int:
    """How many weight copies to rotate through so their total is several times the L2 size."""
    return max(1, min(16, triton.cdiv(200 * 2**20, nbytes)))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def device_ceilings() -> tuple[float, float]:
    """(copy bandwidth bytes/us, bf16 matmul flops/us), measured here."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / bench(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    rate = 2 * 8192**3 / bench(lambda: a @ b)
    return bw, rate


def int4_weight(n: int, k: int, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    packed = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
    scale = (0.01 + 0.01 * torch.rand(n, k // group, device="cuda")).to(torch.bfloat16)
    return packed, scale


def fp8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).to(torch.float8_e4m3fn)
    s = 0.001 + 0.001 * torch.rand(triton.cdiv(n, 128), triton.cdiv(k, 128), device="cuda")
    return w, s


def int8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    return w, 0.001 + 0.001 * torch.rand(n, device="cuda")


def check_linear() -> list[str]:
    """GPU correctness of the three linear kernels on DeepSeek shapes (M spanning every path)."""
    lines = []
    for n, k in [(2048, 7168), (7168, 2048), (24576, 1536)]:
        for m in (1, 16, 128, 1024):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            p, s = int4_weight(n, k)
            z = torch.randint(-2, 3, s.shape, dtype=torch.int8, device="cuda")
            f, fs = fp8_weight(n, k)
            i, iscale = int8_weight(n, k)
            errs = {
                "w4a16": rel(linear_wq(x, p, s, None, 128), linear_wq_ref(x, p, s, None, 128)),
                "w4a16_zp": rel(linear_wq(x, p, s, z, 128), linear_wq_ref(x, p, s, z, 128)),
                "fp8": rel(linear_fp8_block(x, f, fs), linear_fp8_block_ref(x, f, fs)),
                "w8a8": rel(linear_w8a8(x, i, iscale), linear_w8a8_ref(x, i, iscale)),
            }
            bad = {kk: v for kk, v in errs.items() if not v < 1e-2}
            lines.append(f"check N={n} K={k} M={m}: " + " ".join(f"{kk}={v:.1e}" for kk, v in errs.items()))
            print(lines[-1], flush=True)
            if bad:
                raise SystemExit(f"GPU correctness check failed: {bad}")
    return lines


def linear_table(bw: float, rate: float) -> list[str]:
    rows = [
        "| N | K | M | cuBLAS bf16 µs | W4A16 g128 µs | x | floor µs | FP8 block µs | x | floor µs "
        "| W8A8 µs | x | floor µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, k in SHAPES:
        rows += _linear_rows(n, k, bw, rate)
        torch.cuda.empty_cache()
    return rows


def _linear_rows(n: int, k: int, bw: float, rate: float) -> list[str]:
    wb = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies(2 * n * k))]
    w4 = [int4_weight(n, k) for _ in range(copies(n * k // 2))]
    f8 = [fp8_weight(n, k) for _ in range(copies(n * k))]
    i8 = [int8_weight(n, k) for _ in range(copies(n * k))]
    rows = []
    for m in MS:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        flops = 2 * m * n * k
        io = 2 * m * k + 2 * m * n  # x in, y out (bf16)
        t_ref = bench_graph([lambda w=w: F.linear(x, w) for w in wb])  # noqa: B023
        t_w4 = bench_graph([lambda p=p, s=s: linear_wq(x, p, s, None, 128) for p, s in w4])  # noqa: B023
        t_f8 = bench_graph([lambda f=f, s=s: linear_fp8_block(x, f, s) for f, s in f8])  # noqa: B023
        t_i8 = bench_graph([lambda i=i, s=s: linear_w8a8(x, i, s) for i, s in i8])  # noqa: B023
        fl_w4 = max((n * k / 2 + n * k / 64 + io) / bw, flops / rate)
        fl_8 = max((n * k + io) / bw, flops / (2 * rate))
        row = (
            f"| {n} | {k} | {m} | {t_ref:.1f} | {t_w4:.1f} | {t_ref / t_w4:.2f} | {fl_w4:.1f} "
            f"| {t_f8:.1f} | {t_ref / t_f8:.2f} | {fl_8:.1f} | {t_i8:.1f} | {t_ref / t_i8:.2f} | {fl_8:.1f} |"
        )
        rows.append(row)
        print(row, flush=True)
    return rows


def loop_moe(x, ids, weights, w13, w2):
    """The HF DeepSeek-V3 ``moe_infer`` loop: sort by expert, one torch matmul chain per expert."""
    t, k = ids.shape
    counts = torch.bincount(ids.view(-1), minlength=w13.shape[0]).cpu().tolist()
    order = ids.view(-1).argsort()
    tokens = x[order // k]
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        gu = tokens[start : start + c] @ w13[e].T
        outs.append((F.silu(gu[:, :INTER]) * gu[:, INTER:]) @ w2[e].T)
        start += c
    y = torch.empty(t * k, x.shape[1], dtype=x.dtype, device=x.device)
    y[order] = torch.cat(outs)
    return (y.view(t, k, -1) * weights.unsqueeze(-1).to(x.dtype)).sum(1)


def moe_weights() -> dict[str, dict[str, torch.Tensor]]:
    gen = lambda *shape: torch.randn(*shape, dtype=torch.bfloat16, device="cuda") * 0.02  # noqa: E731
    bf16 = dict(w13=gen(E, 2 * INTER, HIDDEN), w2=gen(E, HIDDEN, INTER))
    fp8 = dict(w13=torch.empty(E, 2 * INTER, HIDDEN, dtype=torch.float8_e4m3fn, device="cuda"),
               w2=torch.empty(E, HIDDEN, INTER, dtype=torch.float8_e4m3fn, device="cuda"))
    for e in range(E):  # chunked so no fp32 copy of all experts is ever made
        fp8["w13"][e] = (bf16["w13"][e] * 50).to(torch.float8_e4m3fn)
        fp8["w2"][e] = (bf16["w2"][e] * 50).to(torch.float8_e4m3fn)
    fp8["w13_scale"] = 0.0004 * torch.rand(E, 2 * INTER // 128, HIDDEN // 128, device="cuda") + 0.0002
    fp8["w2_scale"] = 0.0004 * torch.rand(E, HIDDEN // 128, INTER // 128, device="cuda") + 0.0002
    randint = lambda *shape: torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device="cuda")  # noqa: E731
    int4 = dict(
        w13=randint(E, 2 * INTER, HIDDEN // 8), w2=randint(E, HIDDEN, INTER // 8),
        w13_scale=(0.002 + 0.002 * torch.rand(E, 2 * INTER, HIDDEN // 128, device="cuda")).to(torch.bfloat16),
        w2_scale=(0.002 + 0.002 * torch.rand(E, HIDDEN, INTER // 128, device="cuda")).to(torch.bfloat16),
    )
    return {"bf16": bf16, "int4": int4, "fp8": fp8}


def routing(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.rand(t, E, device="cuda").topk(TOPK, dim=-1).indices
    return ids, torch.softmax(torch.randn(t, TOPK, device="cuda"), dim=-1)


def moe_table(bw: float) -> list[str]:
    ws = moe_weights()
    x = torch.randn(16, HIDDEN, dtype=torch.bfloat16, device="cuda")
    ids, tw = routing(16)
    for fmt, w in ws.items():  # GPU correctness first, at full size
        err = rel(moe_experts(x, ids, tw, **w), moe_experts_ref(x, ids, tw, **w))
        print(f"check moe {fmt} T=16: rel err {err:.1e}", flush=True)
        # fp8: the intermediate is re-quantized to fp8, so a 1-ulp bf16 difference in it (summation
        # order) can flip an fp8 rounding (6% of that element); the error is larger by design.
        if not err < (3e-2 if fmt == "fp8" else 1e-2):
            raise SystemExit(f"GPU correctness check failed: moe {fmt} {err}")
    err = rel(loop_moe(x, ids, tw, ws["bf16"]["w13"], ws["bf16"]["w2"]), moe_experts_ref(x, ids, tw, **ws["bf16"]))
    print(f"check torch loop baseline: rel err {err:.1e}", flush=True)
    per_expert = {"bf16": 2 * 3 * INTER * HIDDEN, "int4": 3 * INTER * HIDDEN // 2, "fp8": 3 * INTER * HIDDEN}
    rows = [
        "| tokens | experts hit | torch loop bf16 µs | ours bf16 µs | x | graph µs | floor µs "
        "| ours int4 µs | x | graph µs | floor µs | ours fp8 µs | x | graph µs | floor µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in MOE_TOKENS:
        x = torch.randn(t, HIDDEN, dtype=torch.bfloat16, device="cuda")
        ids, tw = routing(t)
        hit = int(torch.unique(ids).numel())
        t_loop = bench(lambda: loop_moe(x, ids, tw, ws["bf16"]["w13"], ws["bf16"]["w2"]))  # noqa: B023
        cells = [f"| {t} | {hit} | {t_loop:.0f}"]
        for fmt, w in ws.items():
            t_ours = bench(lambda w=w: moe_experts(x, ids, tw, **w))  # noqa: B023
            t_graph = bench_graph([lambda w=w: moe_experts(x, ids, tw, **w)], replays=10)  # noqa: B023
            floor = hit * per_expert[fmt] / bw
            cells.append(f"{t_ours:.0f} | {t_loop / t_ours:.2f} | {t_graph:.0f} | {floor:.0f}")
        rows.append(" | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", choices=["linear", "moe", "all"], default="all")
    ap.add_argument("--out", help="also write the tables as markdown here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU")
    start = time.time()
    bw, rate = device_ceilings()
    head = [
        f"# squeeze.kernels benchmark on {torch.cuda.get_device_name()}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}; measured copy bandwidth "
        f"{bw / 1e6:.2f} TB/s, bf16 matmul {rate / 1e6:.0f} TFLOP/s. Times: do_bench median µs; "
        "x = speed-up over the baseline (cuBLAS bf16 / torch loop); floor = max(bytes / bandwidth, "
        "flops / rate). Linear layers: CUDA-graph replay (GPU time, no launch overhead) over enough "
        "weight copies to defeat L2, ours and cuBLAS alike. MoE: eager calls (do_bench median, as the "
        "torch loop must be: it syncs with the host), plus our CUDA-graph time.",
        "",
    ]
    print("\n".join(head), flush=True)
    out = list(head)
    if args.section in ("linear", "all"):
        check = check_linear()
        out += ["## Linear layers (DeepSeek-V3 shapes), activation quantization included", ""]
        out += linear_table(bw, rate) + [""]
        out += ["GPU correctness (rel. error vs torch reference):", "", *[f"    {c}" for c in check], ""]
    if args.section in ("moe", "all"):
        out += [f"## MoE layer: {E} experts, top-{TOPK}, hidden {HIDDEN}, expert width {INTER}", ""]
        out += moe_table(bw) + [""]
    out += ["Configs chosen by the run-time tuner:", ""]
    out += [f"    {k}: {v}" for k, v in _tuning.chosen().items()]
    out += ["", f"(run took {time.time() - start:.0f} s)"]
    text = "\n".join(out) + "\n"
    print("\n" + text, flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
