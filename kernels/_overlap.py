"""Large-M W4A16 / W8A16: dequantize the weight chunk by chunk on a side stream, overlapped with cuBLAS.

"Dequantize the whole weight to bf16, then cuBLAS" leaves the dequant pass (memory-bound: reads the
packed weight, writes N * K * 2 bytes) fully exposed before the compute-bound GEMM. Here N is cut into
chunks (row counts multiples of ``align``); chunk i + 1 is dequantized on a side stream into one of two
ping-pong bf16 buffers while cuBLAS multiplies chunk i on the GEMM stream, writing ``out[:, n0:n1]``
directly (a strided view: cuBLAS takes ldc = N) or through a contiguous temporary. Events order it:

* GEMM i waits for dequant i;
* dequant i + 2 waits for GEMM i (it overwrites the buffer GEMM i reads);
* the side streams first wait for the caller's stream (inputs ready) and the caller's stream waits for
  both at the end, so the whole thing is one fork / join and can be captured in a CUDA graph.

Only the first chunk's dequant is exposed (``first_div`` > 1 makes that chunk smaller than the others),
and the temporary memory is two chunks instead of a whole bf16 weight.

A cuBLAS GEMM on Hopper tends to fill every SM for its whole duration, leaving a concurrent kernel no
room; ``carveout`` asks cuBLAS to target ``#SMs - carveout`` SMs (torch's experimental SM carve-out,
honoured by the cuBLASLt path, hence ``lt``), leaving those SMs to the dequant. ``prio`` picks the
stream priorities: 0 both default (GEMM on the caller's stream), 1 dequant stream high priority, 2 GEMM on
a private high-priority stream (its blocks are dispatched before pending dequant blocks).

Measured on an H100 (BENCH_H100.md, w4large runs): cuBLAS's persistent ``nvjet`` GEMM holds one CTA per SM
for its whole duration, so with default priorities the next dequant (ready at the same moment as the next
GEMM) takes the whole GPU first and nothing overlaps; with a carve-out of 16-24 SMs the dequant does run
beside the GEMM, but on those few SMs it is about as slow as the GEMM chunk, so the pipeline ends up
dequant-bound. Net: -7% on (18432, 7168) at M = 1024, a tie elsewhere. A lone GEMM slowed with the
carve-out through cuBLASLt (104 / 134 us at 16 / 32 vs 102) but not through plain cuBLAS at 16; the
configs that won use plain cuBLAS with the carve-out set anyway (it helped there, by how much is near noise).

Streams are used only for CUDA tensors; on the CPU (Triton interpreter, tests) the same chunk loop runs
in order on one stream, which checks the chunking, slicing and output placement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

_STREAMS: dict[tuple[int, str], torch.cuda.Stream] = {}

Dequant = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], object]


def chunk_bounds(n: int, chunks: int, first_div: int = 1, align: int = 128) -> list[tuple[int, int]]:
    """[n0, n1) row ranges covering [0, n): ``chunks`` pieces, the first 1 / first_div the size of
    the others, every cut a multiple of ``align`` (fewer pieces when n is too small for that)."""
    chunks = max(1, chunks)
    total = 1 + (chunks - 1) * max(1, first_div)
    cuts, acc = [0], 0
    for i in range(chunks - 1):
        acc += 1 if i == 0 else first_div
        cut = min(n, max(align, round(n * acc / total / align) * align))
        if cuts[-1] < cut < n:
            cuts.append(cut)
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _stream(device: torch.device, role: str, avoid: torch.cuda.Stream) -> torch.cuda.Stream:
    """A private stream per (device, role), never the caller's own stream (a self-wait would serialize)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, role)
    s = _STREAMS.get(key)
    if s is None or s == avoid:
        s = torch.cuda.Stream(device=device, priority=-1 if role.endswith("hi") else 0)
        while s == avoid:
            s = torch.cuda.Stream(device=device, priority=-1 if role.endswith("hi") else 0)
        _STREAMS[key] = s
    return s


@contextlib.contextmanager
def _blas(carveout: int, lt: bool) -> Iterator[None]:
    """Temporarily set torch's cuBLAS SM carve-out and preferred BLAS library (both process globals)."""
    carveout = carveout if hasattr(torch._C, "_set_sm_carveout_experimental") else 0
    prev_c = torch._C._get_sm_carveout_experimental() if carveout else None
    prev_lib = torch.backends.cuda.preferred_blas_library() if lt else None
    try:
        if carveout:
            torch._C._set_sm_carveout_experimental(carveout)
        if lt:
            torch.backends.cuda.preferred_blas_library("cublaslt")
        yield
    finally:
        if carveout:
            torch._C._set_sm_carveout_experimental(prev_c)
        if lt:
            torch.backends.cuda.preferred_blas_library(prev_lib)


def linear_chunked(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    dequant: Dequant,
    out: torch.Tensor | None = None,
    *,
    chunks: int = 4,
    first_div: int = 1,
    carveout: int = 0,
    lt: bool = False,
    prio: int = 0,
    contig_out: bool = False,
    align: int | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W).T through per-chunk dequant + cuBLAS, overlapped on CUDA (see module doc).

    ``dequant(w_rows, scale_rows, zp_rows, buf)`` writes the dense rows into ``buf`` ([rows, K], x's
    dtype). x: [M, K], contiguous rows; out: [M, N] or None.
    """
    m, k = x.shape
    n = weight.shape[0]
    if align is None:
        align = 128 if x.is_cuda else 16
    bounds = chunk_bounds(n, chunks, first_div, align)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    rows = max(b - a for a, b in bounds)
    bufs = [torch.empty(rows, k, dtype=x.dtype, device=x.device) for _ in range(min(2, len(bounds)))]

    def dq(i: int) -> None:
        a, b = bounds[i]
        zp = zero_point[a:b] if zero_point is not None else None
        dequant(weight[a:b], scale[a:b], zp, bufs[i % 2][: b - a])

    def mm(i: int) -> None:
        a, b = bounds[i]
        w = bufs[i % 2][: b - a]
        if contig_out:
            out[:, a:b].copy_(torch.mm(x, w.t()))
        else:
            torch.mm(x, w.t(), out=out[:, a:b])

    if not x.is_cuda:
        for i in range(len(bounds)):
            dq(i)
            mm(i)
        return out

    main = torch.cuda.current_stream(x.device)
    dq_s = _stream(x.device, "dq_hi" if prio == 1 else "dq", main)
    mm_s = _stream(x.device, "mm_hi", main) if prio == 2 else main
    dq_s.wait_stream(main)
    if mm_s is not main:
        mm_s.wait_stream(main)
    with torch.cuda.stream(dq_s):
        dq(0)
    dq_done = [dq_s.record_event()]
    mm_done: list[torch.cuda.Event] = []
    for i in range(len(bounds)):
        if i + 1 < len(bounds):
            if i >= 1:
                dq_s.wait_event(mm_done[i - 1])  # buffer (i + 1) % 2 was last read by GEMM i - 1
            with torch.cuda.stream(dq_s):
                dq(i + 1)
            dq_done.append(dq_s.record_event())
        mm_s.wait_event(dq_done[i])
        with torch.cuda.stream(mm_s), _blas(carveout, lt):
            mm(i)
        mm_done.append(mm_s.record_event())
    if mm_s is not main:
        main.wait_stream(mm_s)
    main.wait_stream(dq_s)
    return out
