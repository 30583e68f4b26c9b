"""Replay small eager calls from cached CUDA graphs: at decode sizes an eager call is host-bound.

Why: at T = 1 the int4 MoE layer's kernels take ~93-97 us of GPU time on an H100, but an eager call cost
192-405 us on the lent VMs, nearly all of it Python: Triton spends tens of us per launch binding
arguments, hashing the specialization and filling TMA descriptors. A graph replay pays one launch for all
of them. Serving stacks graph the whole model; an eager user (transformers' ``generate``) gets it here.
Measured (H100, 2026-12-07, same process): int4 MoE T = 1 114 us eager with replays vs 192 without; a W4A16
linear at M = 1 on (2048, 7168) 18.3 vs 68.1 us. A call the GPU already bounds pays the input copy and output
clone: (18432, 7168) 47.4 vs 42.4 us, fp8 MoE T = 1 169 vs 162.

What keeps a replay correct:

* The key holds everything the captured launches baked in: the op's own key (shapes, dtypes, config),
  the device, the current stream, the inputs' shapes / strides / dtypes and the *addresses* of the fixed
  operands (weights): a graph reads a weight through the pointer it was captured with. A key hit means a
  live tensor of that shape is at that address now, so the graph reads valid memory, whatever the tensor.
* The per-call inputs are copied into the graph's own buffers before each replay, and its output is
  copied out right after it on the same stream, so the caller never holds memory a later replay writes.
* Graphs captured for one stream share one memory pool: replays on a stream run in order and each output
  is copied out before the next replay starts, so one graph reusing another's freed scratch is harmless.
  Streams never share a pool (two streams' replays may overlap).
* Never while the caller is capturing (their graph records the eager launches instead) nor when autograd
  would need a graph of its own (inputs that require grad).
* A key is captured the second time it is seen: the first call runs eagerly (it compiles and tunes the
  kernels, which must not happen under capture), and a shape seen once (a prefill) costs no capture.
  A graph holds its input and output buffers (decode sizes: kilobytes) and its share of the stream's pool.

``SQUEEZE_KERNELS_NO_GRAPHS=1`` turns replays off (every call eager).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

# Calls on up to this many tokens (rows of x) replay a graph. At these sizes the host bounds an eager call: int4
# MoE at T = 1 (H100) 93-97 us of GPU time against 192-405 us eager on the lent VMs; a W4A16 linear
# at M <= 16 8-36 us against two or three Triton launches at ~50 us each. Larger calls are GPU-bound (and a
# prefill's varying lengths would each need a graph).
MAX_ROWS = 16
# Past this many cached graphs new keys run eagerly. Not evicting: a model's layers are called in a cycle,
# and a cycle longer than the cache would evict every graph before its next use, capturing on every call.
MAX_ENTRIES = 4096


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


_GRAPHS: dict[Hashable, _Entry] = {}
_SEEN: set[Hashable] = set()
_EAGER: set[Hashable] = set()  # keys whose capture failed
_POOLS: dict[tuple[int, int], object] = {}  # (device, stream) -> graph memory pool handle


def applicable(x: torch.Tensor) -> bool:
    """Whether a call on the 2-D activations ``x`` may be replayed (see the module doc for each condition)."""
    return (
        x.shape[0] <= MAX_ROWS
        and x.is_cuda
        and not x.requires_grad
        and os.environ.get("SQUEEZE_KERNELS_NO_GRAPHS") != "1"
        and not torch.cuda.is_current_stream_capturing()
    )


def run(
    op_key: Hashable,
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    fixed: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """``fn(*inputs)``, from a cached graph once this call's key has been seen before (callers check
    :func:`applicable` first). ``fixed`` are the tensors ``fn`` reads besides ``inputs`` (weights), by address."""
    stream = torch.cuda.current_stream(inputs[0].device)
    key = (
        op_key,
        stream.device_index,
        stream.cuda_stream,
        tuple((t.shape, t.stride(), t.dtype) for t in inputs),
        tuple(None if t is None else (t.data_ptr(), t.stride()) for t in fixed),
    )
    entry = _GRAPHS.get(key)
    if entry is None:
        if key not in _SEEN or len(_GRAPHS) >= MAX_ENTRIES:
            if len(_SEEN) < 4 * MAX_ENTRIES:
                _SEEN.add(key)
            return fn(*inputs)
        entry = None if key in _EAGER else _capture(key, fn, inputs, (stream.device_index, stream.cuda_stream))
        if entry is None:
            return fn(*inputs)
    for buf, t in zip(entry.inputs, inputs, strict=True):
        buf.copy_(t)
    entry.graph.replay()
    return entry.output.clone()


def _capture(
    key: Hashable, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], pool_key: tuple[int, int]
) -> _Entry | None:
    """Record ``fn`` on a side stream into a new graph; None (and the key stays eager) if it cannot be captured.

    Not ``torch.cuda.graph``: that empties the caching allocator on every capture, which would hand the
    model's cached blocks back to the driver once per layer and shape."""
    bufs = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in inputs]
    for buf, t in zip(bufs, inputs, strict=True):
        buf.copy_(t)  # real values: a kernel must never see garbage, even under capture
    pool = _POOLS.get(pool_key)
    if pool is None:
        pool = _POOLS[pool_key] = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(inputs[0].device)
    side.wait_stream(torch.cuda.current_stream(inputs[0].device))
    try:
        with torch.cuda.stream(side):
            graph.capture_begin(pool=pool)
            try:
                out = fn(*bufs)
            finally:
                graph.capture_end()
    except Exception:  # an op that cannot be captured: this key runs eagerly from now on
        _EAGER.add(key)
        return None
    finally:
        torch.cuda.current_stream(inputs[0].device).wait_stream(side)
    entry = _Entry(graph, bufs, out)
    _GRAPHS[key] = entry
    return entry


def clear() -> None:
    """Drop every cached graph (tests; or to free their buffers)."""
    _GRAPHS.clear()
    _SEEN.clear()
    _EAGER.clear()


def cached() -> int:
    """How many graphs are cached (for tests)."""
    return len(_GRAPHS)
