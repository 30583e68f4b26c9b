"""A tiny run-time config picker (what triton.autotune does, minus the parts that get in the way).

We tune whole *launch strategies*, not only tile sizes: split-K changes the grid and needs a
workspace, and for large M "dequantize once, then cuBLAS" competes with the fused kernel. So a
candidate is any hashable config the op's launcher understands, and the winner per shape key is
cached for the process. In the interpreter (or with SQUEEZE_KERNELS_NO_TUNE=1) the first candidate
is used, which keeps CPU tests fast and deterministic.

An op may pass ``check(candidate) -> bool`` (its output against the reference, on a NaN-poisoned
output): a candidate that fails it (or raises) is never picked. If none passes, the first candidate is
kept (it is the op's most general one).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

C = TypeVar("C", bound=Hashable)

_BEST: dict[Hashable, Hashable] = {}
_TIMES: dict[Hashable, list[tuple[Hashable, float, bool]]] = {}
_FLUSH_MS: dict[tuple[int, bool], float] = {}  # (device, graphed) -> ms of the L2 flush alone


def pick(
    key: Hashable,
    candidates: Sequence[C],
    launch: Callable[[C], object],
    on_cuda: bool,
    check: Callable[[C], bool] | None = None,
) -> C:
    """Return the candidate with the least GPU time for ``key`` (see :func:`_time`) among those that
    pass ``check``, memoized."""
    if len(candidates) == 1 or not on_cuda or os.environ.get("SQUEEZE_KERNELS_NO_TUNE") == "1":
        return candidates[0]
    if key in _BEST:
        return _BEST[key]  # type: ignore[return-value]
    ok = [_passes(check, cfg) for cfg in candidates]
    times = [_time(lambda c=cfg: launch(c)) if good else float("inf") for cfg, good in zip(candidates, ok, strict=True)]
    _TIMES[key] = list(zip(candidates, times, ok, strict=True))
    best_i = min(range(len(candidates)), key=times.__getitem__)
    best = candidates[0] if times[best_i] == float("inf") else candidates[best_i]
    _BEST[key] = best
    return best


def _passes(check: Callable[[C], bool] | None, cfg: C) -> bool:
    if check is None:
        return True
    try:
        return bool(check(cfg))
    except Exception:  # a config that cannot run (e.g. too much shared memory) is not a candidate
        return False


def _time(fn: Callable[[], object]) -> float:
    """GPU time of one call from cold L2: CUDA-graph replays when capturable (what decode pays), else do_bench.

    Eager timing would include the Python launch cost, which favours fewer launches over faster
    kernels; a graph measures the kernels themselves. Each replay first reads a buffer twice the L2
    size, and that read's own time is subtracted: a deep model's layer finds its weight out of L2
    (the next layers' weights passed through it), while a weight that fits in L2 (24576 x 1536 int4
    is 19 MB of the H100's 50) would otherwise be timed L2-resident. In the H100 run that introduced
    it, it changed no M = 1 pick; ranks under ~15% still differ from the bench's rotating-copies
    timing on small shapes (BENCH_H100.md). inf if the config cannot run at all.
    """
    import torch
    import triton.testing

    try:
        fn()  # compile outside any capture
        torch.cuda.synchronize()
    except Exception:  # e.g. a tile that exceeds shared memory on this GPU
        return float("inf")
    device = torch.cuda.current_device()
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    buf = torch.empty(max(1, l2 // 2), dtype=torch.float32, device="cuda")  # 2x L2 bytes
    flush = lambda: torch.amax(buf)  # noqa: E731
    cold = lambda: (flush(), fn())  # noqa: E731
    try:
        both = triton.testing.do_bench_cudagraph(cold, rep=20, return_mode="median")
        graphed = True
    except Exception:
        torch.cuda.synchronize()
        both = triton.testing.do_bench(cold, warmup=5, rep=25, return_mode="median")
        graphed = False
    key = (device, graphed)  # the flush's own time is the same for every candidate: measured once
    if key not in _FLUSH_MS:
        if graphed:
            _FLUSH_MS[key] = triton.testing.do_bench_cudagraph(flush, rep=20, return_mode="median")
        else:
            _FLUSH_MS[key] = triton.testing.do_bench(flush, warmup=5, rep=25, return_mode="median")
    return max(both - _FLUSH_MS[key], 1e-6)


def chosen() -> dict[Hashable, Hashable]:
    """The configs picked so far (the benchmark prints them)."""
    return dict(_BEST)


def timings() -> dict[Hashable, list[tuple[Hashable, float, bool]]]:
    """Every tuned key's (candidate, ms, passed check) list, in candidate order."""
    return dict(_TIMES)
