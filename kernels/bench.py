"""Benchmark the kernels against cuBLAS bf16 and a per-expert torch loop (needs a CUDA GPU).

    python -m squeeze.kernels.bench [--section linear|moe|all|w4large|anchors] [--ms 1,16] [--out FILE.md]

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

from . import _overlap, _tuning, w4a16
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
        for m in [m for m in (1, 16, 128, 1024) if m in MS]:
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


def tinygemm_weight(n: int, k: int, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's int4 tinygemm operands (random): the packed weight and its [K / group, N, 2] scales-and-zeros."""
    raw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    packed = torch.ops.aten._convert_weight_to_int4pack(raw, 8)
    sz = (0.01 * torch.rand(k // group, n, 2, device="cuda")).to(torch.bfloat16)
    return packed, sz


def anchor_table() -> list[str]:
    """W4A16 against torch's int4 tinygemm (TARGETS' anchor) at the same group size, same run, same timing."""
    rows = [
        "| N | K | M | cuBLAS bf16 µs | torch tinygemm int4 g128 µs | W4A16 g128 µs | x vs tinygemm |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, k in SHAPES:
        wb = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies(2 * n * k))]
        w4 = [int4_weight(n, k) for _ in range(copies(n * k // 2))]
        tg = [tinygemm_weight(n, k) for _ in range(copies(n * k // 2))]
        for m in MS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            t_ref = bench_graph([lambda w=w: F.linear(x, w) for w in wb])  # noqa: B023
            t_w4 = bench_graph([lambda p=p, s=s: linear_wq(x, p, s, None, 128) for p, s in w4])  # noqa: B023
            t_tg = bench_graph([lambda p=p, s=s: torch.ops.aten._weight_int4pack_mm(x, p, 128, s) for p, s in tg])  # noqa: B023
            rows.append(f"| {n} | {k} | {m} | {t_ref:.1f} | {t_tg:.1f} | {t_w4:.1f} | {t_tg / t_w4:.2f} |")
            print(rows[-1], flush=True)
        del wb, w4, tg
        torch.cuda.empty_cache()
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
    # GPU correctness first, at full size. Three calls per size on new tokens and routing: at decode sizes
    # the first runs eagerly, the second captures a CUDA graph and replays it, the third replays (_graphs).
    for t, trial in ((1, 0), (1, 1), (1, 2), (16, 0), (16, 1), (16, 2)):
        x = torch.randn(t, HIDDEN, dtype=torch.bfloat16, device="cuda")
        ids, tw = routing(t)
        for fmt, w in ws.items():
            err = rel(moe_experts(x, ids, tw, **w), moe_experts_ref(x, ids, tw, **w))
            print(f"check moe {fmt} T={t} call {trial + 1}: rel err {err:.1e}", flush=True)
            # fp8: the intermediate is re-quantized to fp8, so a 1-ulp bf16 difference in it (summation
            # order) can flip an fp8 rounding (6% of that element); the error is larger by design.
            if not err < (3e-2 if fmt == "fp8" else 1e-2):
                raise SystemExit(f"GPU correctness check failed: moe {fmt} T={t} call {trial + 1}: {err}")
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
    ap.add_argument("--section", choices=["linear", "moe", "all", "w4large", "anchors"], default="all")
    ap.add_argument("--out", help="also write the tables as markdown here")
    ap.add_argument("--ms", help="comma-separated M values for the linear and anchors sections (default: all)")
    args = ap.parse_args()
    if args.ms:
        MS[:] = [int(v) for v in args.ms.split(",")]
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU")
    start = time.time()
    if args.section == "w4large":
        w4_large(args.out)
        return
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
    if args.section == "anchors":
        out += ["## W4A16 vs torch's int4 tinygemm (TARGETS' anchor), same run", ""]
        out += anchor_table() + [""]
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


W4_LARGE_MS = [1024, 4096]


def _ms(fn: Callable[[], object]) -> float:
    """Tuner-style GPU time (µs) of one call on one weight (CUDA-graph replays)."""
    return _tuning._time(fn) * 1e3


def _check_w4_large(lines: list[str], extra: list | None = None) -> None:
    """GPU correctness of the overlapped path: eager on poisoned outputs, then CUDA-graph replays with
    fresh inputs each time (a missing event would show up as a wrong or moving result)."""
    extra = extra or [
        w4a16.WqConfig(dequant_cublas=True, chunks=4, prio=1),
        w4a16.WqConfig(dequant_cublas=True, chunks=3, contig_out=True),
        w4a16.WqConfig(dequant_cublas=True, chunks=5, carveout=16, lt=False, prio=2),
    ]
    for n, k, m in [(2048, 7168, 1024), (7168, 2048, 300), (24576, 1536, 1024)]:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        p, s = int4_weight(n, k)
        z = torch.randint(-2, 3, s.shape, dtype=torch.int8, device="cuda")
        for zp in (None, z):
            ref = linear_wq_ref(x, p, s, zp, 128)
            for cfg in w4a16.OVERLAP + extra:
                out = torch.full((m, n), float("nan"), dtype=x.dtype, device="cuda")
                try:
                    err = rel(w4a16.launch_wq(x, p, s, zp, 128, cfg, out=out), ref)
                except Exception as e:  # noqa: BLE001 - report, the tuner's own check excludes it
                    err, cfg = float("inf"), f"{_short(cfg)} raised {type(e).__name__}: {str(e)[:160]}"
                line = f"check eager N={n} K={k} M={m} zp={zp is not None} {_short(cfg)}: {err:.1e}"
                lines.append(line + ("" if err < 1e-2 else "  FAILED"))
    n, k, m = 18432, 7168, 1024
    p, s = int4_weight(n, k)
    w = w4a16.dequantize_to(p, s, None, 128, torch.bfloat16)
    xs = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    for cfg in [w4a16.OVERLAP[0], w4a16.OVERLAP[-1], extra[0]]:
        run = lambda c=cfg: w4a16.launch_wq(xs, p, s, None, 128, c)  # noqa: E731
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = run()
        errs = []
        for _ in range(3):
            xs.copy_(torch.randn(m, k, dtype=torch.bfloat16, device="cuda"))
            y.fill_(float("nan"))
            g.replay()
            errs.append(rel(y, F.linear(xs, w)))
        line = f"check graph N={n} K={k} M={m} {_short(cfg)}: vs dequant+cuBLAS " + " ".join(f"{e:.1e}" for e in errs)
        lines.append(line + ("" if max(errs) < 1e-2 else "  FAILED"))
        del g, y


def _short(cfg: object) -> str:
    if not isinstance(cfg, w4a16.WqConfig):
        return str(cfg)
    if cfg.chunks:
        return (f"ovl c{cfg.chunks} f{cfg.first_div} co{cfg.carveout}{'lt' if cfg.lt else ''} p{cfg.prio}"
                + (" contig" if cfg.contig_out else "")
                + (f" dq{cfg.dq_block_n}w{cfg.dq_warps}" if (cfg.dq_block_n, cfg.dq_warps) != (64, 4) else ""))
    if cfg.dequant_cublas:
        return "old dequant+cuBLAS"
    return f"fused {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"


def _diag(lines: list[str], out_dir: str | None) -> None:
    """One chunk of (18432, 7168) at M = 1024 alone: is the carve-out honoured, what does a chunk cost;
    plus a kernel timeline of one graph replay of two overlapped configs."""
    x = torch.randn(1024, 7168, dtype=torch.bfloat16, device="cuda")
    wc = torch.randn(4608, 7168, dtype=torch.bfloat16, device="cuda")
    for co, lt in [(0, False), (0, True), (16, False), (16, True), (32, True)]:
        def mm(co=co, lt=lt):
            with _overlap._blas(co, lt):
                return torch.mm(x, wc.t())
        lines.append(f"diag GEMM 1024x4608x7168 carveout={co} lt={lt}: {_ms(mm):.1f} us")
    p, s = int4_weight(4608, 7168)
    buf = torch.empty(4608, 7168, dtype=torch.bfloat16, device="cuda")
    t = _ms(lambda: w4a16.dequantize_to(p, s, None, 128, torch.bfloat16, out=buf))
    lines.append(f"diag dequant 4608x7168 chunk: {t:.1f} us ({(4608 * 7168 * 2.5) / t / 1e6:.2f} TB/s)")
    print("\n".join(lines[-6:]), flush=True)
    import json
    import os

    from torch.profiler import ProfilerActivity, profile

    p, s = int4_weight(18432, 7168)
    for cfg in [w4a16.WqConfig(dequant_cublas=True, chunks=4),
                w4a16.WqConfig(dequant_cublas=True, chunks=4, first_div=2, carveout=16, lt=True, prio=2)]:
        run = lambda c=cfg: w4a16.launch_wq(x, p, s, None, 128, c)  # noqa: E731
        run()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        g.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g.replay()
            torch.cuda.synchronize()
        path = os.path.join(out_dir or ".", f"trace_{cfg.chunks}_{cfg.carveout}_{cfg.prio}.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            evs = [e for e in json.load(fh)["traceEvents"] if e.get("cat") == "kernel"]
        evs.sort(key=lambda e: e["ts"])
        t0 = evs[0]["ts"] if evs else 0
        lines.append(f"timeline (18432,7168) M=1024 {_short(cfg)}: stream start+dur us grid name")
        for e in evs[:24]:
            a = e.get("args", {})
            lines.append(f"  s{a.get('stream')} {e['ts'] - t0:7.1f} +{e['dur']:6.1f} {a.get('grid')} {e['name'][:60]}")
        print("\n".join(lines[-min(len(evs), 24) - 1:]), flush=True)
        del g


def _sweep(n: int, k: int, m: int, lines: list[str], deadline: float, best: w4a16.WqConfig | None = None,
           stages: list | None = None) -> w4a16.WqConfig:
    """Greedy coordinate descent over the overlapped path's knobs (tuner-style timing, one weight)."""
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    p, s = int4_weight(n, k)
    seen: dict[w4a16.WqConfig, float] = {}

    def t(cfg: w4a16.WqConfig) -> float:
        if cfg not in seen:
            seen[cfg] = _ms(lambda: w4a16.launch_wq(x, p, s, None, 128, cfg)) if time.time() < deadline else 1e9
        return seen[cfg]

    from dataclasses import replace

    best = best or w4a16.WqConfig(dequant_cublas=True, chunks=4)
    stages = stages or [
        [dict(chunks=c) for c in (2, 3, 4, 6, 8)],
        [dict(carveout=c, lt=c > 0) for c in (0, 8, 16, 24, 32)] + [dict(carveout=16, lt=False)],
        [dict(prio=q) for q in (0, 1, 2)],
        [dict(first_div=f) for f in (1, 2, 3)],
        [dict(contig_out=b) for b in (False, True)],
        [dict(chunks=c) for c in (2, 3, 4, 6, 8, 12)],
    ]
    for stage in stages:
        for kw in stage:
            cand = replace(best, **kw)
            if t(cand) < t(best):
                best = cand
    t_old = _ms(lambda: w4a16.launch_wq(x, p, s, None, 128, w4a16.WqConfig(dequant_cublas=True)))
    lines.append(f"sweep N={n} K={k} M={m}: old {t_old:.1f} us; best {_short(best)} {seen[best]:.1f} us; tried "
                 + ", ".join(f"[{_short(c)}] {v:.0f}" for c, v in seen.items() if v < 1e8))
    print(lines[-1], flush=True)
    return best


def w4_large(out: str | None) -> None:
    """W4A16 at large M: the overlapped chunked dequant + cuBLAS against the old path and cuBLAS bf16."""
    import os

    start = time.time()
    out_dir = os.path.dirname(out) if out else None
    lines = [f"# W4A16 large M on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton.__version__}"]
    print(lines[0], flush=True)
    phase2 = os.environ.get("W4_PHASE") == "2"  # second run: dequant tiles and carve-out around run 1's winners
    dq = [dict(dq_block_n=b, dq_warps=w) for b, w in ((64, 4), (128, 4), (128, 8), (32, 4), (64, 8))]
    _check_w4_large(lines, [w4a16.WqConfig(dequant_cublas=True, chunks=3, **kw) for kw in dq[1:]] if phase2 else None)
    print("\n".join(lines[1:]), flush=True)
    lines.append(f"(checks done at {time.time() - start:.0f} s)")
    if not phase2:
        try:
            _diag(lines, out_dir)
        except Exception as e:  # noqa: BLE001 - diagnostics only
            lines.append(f"diag failed: {type(e).__name__}: {str(e)[:200]}")
        lines.append(f"(diag done at {time.time() - start:.0f} s)")
    winners: list[w4a16.WqConfig] = list(w4a16.OVERLAP) if phase2 else []
    deadline = start + float(os.environ.get("W4_SWEEP_UNTIL", "200"))
    ovl = lambda c, f, co, p: w4a16.WqConfig(dequant_cublas=True, chunks=c, first_div=f, carveout=co, prio=p)  # noqa: E731
    todo = {(18432, 7168, 1024): ovl(8, 1, 16, 2), (18432, 7168, 4096): ovl(8, 1, 0, 0),
            (24576, 1536, 1024): ovl(3, 1, 16, 0), (24576, 1536, 4096): ovl(2, 2, 0, 0)}
    stages2 = [dq, [dict(carveout=c) for c in (0, 16, 20, 24)], [dict(prio=q) for q in (0, 2)],
               [dict(chunks=c) for c in (2, 3, 4, 6, 8, 12)]]
    for n, k in SHAPES:
        for m in W4_LARGE_MS:
            if phase2 and (n, k, m) not in todo:
                continue
            try:
                b = (_sweep(n, k, m, lines, deadline, todo[(n, k, m)], stages2) if phase2
                     else _sweep(n, k, m, lines, deadline))
            except Exception as e:  # noqa: BLE001 - one shape must not end the run
                lines.append(f"sweep N={n} K={k} M={m} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            if b not in winners:
                winners.append(b)
            torch.cuda.empty_cache()
    lines.append(f"(sweep done at {time.time() - start:.0f} s)")
    if os.environ.get("W4_USE_WINNERS", "1") == "1":
        w4a16.OVERLAP[:] = winners
    lines.append("OVERLAP candidates given to the tuner: " + "; ".join(repr(c) for c in w4a16.OVERLAP))
    _tuning._BEST.clear()
    rows = ["| N | K | M | cuBLAS bf16 µs | old dequant+cuBLAS µs | x cuBLAS time | tuned µs | x cuBLAS time "
            "| tuner pick | best overlapped µs (forced) | x cuBLAS time |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, k in SHAPES:
        wb = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies(2 * n * k))]
        w4 = [int4_weight(n, k) for _ in range(copies(n * k // 2))]
        for m in W4_LARGE_MS:
            try:
                rows.append(_final_row(n, k, m, wb, w4, lines))
            except Exception as e:  # noqa: BLE001
                lines.append(f"final N={n} K={k} M={m} failed: {type(e).__name__}: {str(e)[:200]}")
            print(lines[-1], flush=True)
            print(rows[-1], flush=True)
        del wb, w4
        torch.cuda.empty_cache()
    lines += ["", *rows, "", f"(run took {time.time() - start:.0f} s)"]
    text = "\n".join(lines) + "\n"
    print("\n" + "\n".join(rows), flush=True)
    fails = [ln for ln in lines if "FAILED" in ln]
    print(f"{len(fails)} lines with FAILED" + "".join("\n  " + ln[:300] for ln in fails), flush=True)
    if out:
        with open(out, "w") as fh:
            fh.write(text)


def _final_row(n: int, k: int, m: int, wb: list, w4: list, lines: list[str]) -> str:
    """One table row: cuBLAS bf16, the old path, the tuned op and the best overlapped config, same run."""
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    t_ref = bench_graph([lambda w=w: F.linear(x, w) for w in wb])  # noqa: B023
    old = w4a16.WqConfig(dequant_cublas=True)
    t_old = bench_graph([lambda p=p, s=s: w4a16.launch_wq(x, p, s, None, 128, old) for p, s in w4])  # noqa: B023
    err = rel(linear_wq(x, *w4[0], None, 128)[:64], linear_wq_ref(x[:64], *w4[0], None, 128))
    key = next(kk for kk in _tuning.chosen() if kk[3] == m and kk[4] == n and kk[5] == k)
    pick = _tuning.chosen()[key]
    t_auto = bench_graph([lambda p=p, s=s: linear_wq(x, p, s, None, 128) for p, s in w4])  # noqa: B023
    ovl = [(v, c) for c, v, ok in _tuning.timings()[key] if ok and getattr(c, "chunks", 0)]
    best = min(ovl, key=lambda vc: vc[0])[1] if ovl else None
    t_best = (bench_graph([lambda p=p, s=s, c=best: w4a16.launch_wq(x, p, s, None, 128, c) for p, s in w4])  # noqa: B023
              if best is not None else float("nan"))
    lines.append(f"tuner N={n} K={k} M={m} (err {err:.1e}): " + ", ".join(
        f"[{_short(c)}] {v * 1e3:.0f}{'' if ok else ' FAILED CHECK'}" for c, v, ok in _tuning.timings()[key]))
    print(lines[-1], flush=True)
    return (f"| {n} | {k} | {m} | {t_ref:.1f} | {t_old:.1f} | {t_old / t_ref:.2f} | {t_auto:.1f} | "
            f"{t_auto / t_ref:.2f} | {_short(pick)} | {t_best:.1f} | {t_best / t_ref:.2f} |")


if __name__ == "__main__":
    main()
