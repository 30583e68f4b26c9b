"""A tiny run-time config picker (what triton.autotune does, minus the parts that get in the way).

We tune whole *launch strategies*, not only tile sizes: split-K changes the grid and needs a
workspace, and for large M "dequantize once, then cuBLAS" competes with the fused kernel. So a
candidate is any hashable config the op's launcher understands, and the winner per shape key is
cached for the process. In the interpreter (or with SQUEEZE_KERNELS_NO_TUNE=1) the first candidate
is used, which keeps CPU tests fast and deterministic.

Candidates come from a factory called only on a cache miss: building an op's list of frozen dataclass
configs on every call cost ~40 us of host time per W4A16 decode call (12 configs of ~20 fields each, timed
on the 2-core development machine), more than the GPU time of its kernels on the small shapes (8-12 us), and
an eager decode step pays it per layer.

An op may pass ``check(candidate) -> bool`` (its output against the reference, on a NaN-poisoned
output): a candidate that fails it (or raises) is never picked. If none passes, the first candidate is
kept (it is the op's most general one) and a RuntimeWarning says so.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

C = TypeVar("C", bound=Hashable)

_BEST: dict[Hashable, Hashable] = {}
_TIMES: dict[Hashable, list[tuple[Hashable, float, bool]]] = {}
_FLUSH_MS: dict[tuple[int, bool], float] = {}  # (device, graphed) -> ms of the L2 flush alone


def pick(
    key: Hashable,
    candidates: Callable[[], Sequence[C]],
    launch: Callable[[C], object],
    on_cuda: bool,
    check: Callable[[C], bool] | None = None,
    cold: Callable[[], list[Callable[[C], object]]] | None = None,
) -> C:
    """Return the candidate (of those ``candidates()`` lists) with the least GPU time for ``key`` (see
    :func:`_time`) among those that pass ``check``, memoized. ``cold`` (called once, only when tuning)
    returns more launchers like ``launch``, each on its own copy of the op's weights (:func:`cold_copies`)."""
    best = _BEST.get(key)
    if best is not None:  # the hot path: one dict lookup per call
        return best  # type: ignore[return-value]
    cands = candidates()
    if len(cands) == 1 or not on_cuda or os.environ.get("SQUEEZE_KERNELS_NO_TUNE") == "1":
        return cands[0]
    return _tune(key, cands, launch, check, cold)


def _tune(
    key: Hashable,
    candidates: Sequence[C],
    launch: Callable[[C], object],
    check: Callable[[C], bool] | None,
    cold: Callable[[], list[Callable[[C], object]]] | None,
) -> C:
    errors: list[str] = []
    ok = [_passes(check, cfg, errors) for cfg in candidates]
    if check is not None and not any(ok):  # a broken check once hid every decode candidate but the first
        warnings.warn(
            f"squeeze.kernels: no candidate for {key} passed the reference check "
            f"({errors[0] if errors else 'wrong output'}); using the first",
            RuntimeWarning, stacklevel=4,
        )
    extra = cold() if cold is not None else []
    times = [
        _time(lambda c=cfg: launch(c), [lambda c=cfg, f=f: f(c) for f in extra]) if good else float("inf")
        for cfg, good in zip(candidates, ok, strict=True)
    ]
    del extra
    _TIMES[key] = list(zip(candidates, times, ok, strict=True))
    best_i = min(range(len(candidates)), key=times.__getitem__)
    best = candidates[0] if times[best_i] == float("inf") else candidates[best_i]
    _BEST[key] = best
    return best


def _passes(check: Callable[[C], bool] | None, cfg: C, errors: list[str]) -> bool:
    if check is None:
        return True
    try:
        return bool(check(cfg))
    except Exception as e:  # a config that cannot run (e.g. too much shared memory) is not a candidate
        errors.append(f"{type(e).__name__}: {e}")
        return False


def cold_copies(*tensors: object) -> list[tuple]:
    """Copies of an op's weight operands for :func:`pick` to rotate through: enough that together they
    fill twice the L2, so every timed call finds its weight out of L2 with no flush in between. None
    (the flush is used) when the weights take a quarter of the L2 or more; non-tensors pass through."""
    import torch

    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    if not ts or not ts[0].is_cuda or nbytes == 0:
        return []
    l2 = torch.cuda.get_device_properties(ts[0].device).L2_cache_size
    if 4 * nbytes >= l2:
        return []
    n = min(15, -(-2 * l2 // nbytes) - 1)
    return [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in tensors) for _ in range(n)]


def _time(fn: Callable[[], object], extra: Sequence[Callable[[], object]] = ()) -> float:
    """GPU time of one call from cold L2: CUDA-graph replays when capturable (what decode pays), else do_bench.

    Eager timing would include the Python launch cost, which favours fewer launches over faster
    kernels; a graph measures the kernels themselves. A deep model's layer finds its weight out of
    L2 (the next layers' weights passed through it), so the weight must be cold here too. With
    ``extra`` (the same call on other weight copies) the graph runs every copy in turn, as the
    benchmark does, and the time is per call. Without, each replay first reads a buffer twice the L2
    size, and that read's own time is subtracted. For a small weight that was off by up to 1 us, as
    much as the gaps between candidates (H100, 7168 x 2048 int4 GEMV: 9.3 us against the benchmark's
    8.3, the copies 8.1), hence the copies there. inf if the config cannot run at all.
    """
    import torch
    import triton.testing

    calls = [fn, *extra]
    try:
        for f in calls:  # compile outside any capture
            f()
        torch.cuda.synchronize()
    except Exception:  # e.g. a tile that exceeds shared memory on this GPU
        return float("inf")
    if extra:
        run_all = lambda: [f() for f in calls]  # noqa: E731
        try:
            t = triton.testing.do_bench_cudagraph(run_all, rep=20, return_mode="median")
        except Exception:
            torch.cuda.synchronize()
            t = triton.testing.do_bench(run_all, warmup=5, rep=25, return_mode="median")
        return t / len(calls)
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
