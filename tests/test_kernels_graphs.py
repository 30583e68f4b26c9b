"""Decode calls replayed from cached CUDA graphs (kernels/_graphs.py): same numbers as the eager path.

These need a CUDA GPU (graphs do not exist on the CPU; there every call is eager, which the other kernel
tests cover). Run on the lent GPU with the benchmark; CI skips them.
"""

from __future__ import annotations

import pytest
import torch

from squeeze.kernels import _graphs, linear_fp8_block, linear_w4a16, linear_w8a8, moe_experts, pack_int4
from squeeze.kernels.reference import (
    linear_fp8_block_ref,
    linear_w8a8_ref,
    linear_wq_ref,
    moe_experts_ref,
)
from tests.conftest_kernels import rel_err as rel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _weights(kind: str, g: torch.Generator) -> tuple[tuple, object, object]:
    """(weight operands, our op, the reference) for a 256 x 512 layer."""
    n, k = 256, 512
    if kind == "w4a16":
        w = pack_int4(torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int32))
        s = (0.01 + 0.01 * torch.rand(n, k // 128, generator=g, device="cuda")).to(torch.bfloat16)
        return (w, s), linear_w4a16, lambda x, w, s: linear_wq_ref(x, w, s, None, 128)
    if kind == "fp8":
        w = torch.randn(n, k, generator=g, device="cuda").to(torch.float8_e4m3fn)
        s = 0.002 + 0.002 * torch.rand(n // 128, k // 128, generator=g, device="cuda")
        return (w, s), linear_fp8_block, linear_fp8_block_ref
    w = torch.randint(-127, 128, (n, k), generator=g, device="cuda", dtype=torch.int8)
    s = 0.001 + 0.001 * torch.rand(n, 1, generator=g, device="cuda")
    return (w, s), linear_w8a8, linear_w8a8_ref


@pytest.mark.parametrize("kind", ["w4a16", "fp8", "w8a8"])
@pytest.mark.parametrize("m", [1, 5])
def test_linear_replays_match_reference_and_outputs_stay_put(kind: str, m: int) -> None:
    """Call 1 eager, call 2 captures + replays, calls 3-4 replay; each on new x. Every output is compared
    after the last call: a replay that wrote into an earlier call's output would fail here."""
    g = torch.Generator(device="cuda").manual_seed(m)
    ws, op, ref = _weights(kind, g)
    xs = [torch.randn(m, ws[0].shape[1] * (8 if kind == "w4a16" else 1), generator=g, device="cuda",
                      dtype=torch.bfloat16) for _ in range(4)]
    before = _graphs.cached()
    outs = [op(x, *ws) for x in xs]
    assert _graphs.cached() == before + 1
    for x, y in zip(xs, outs, strict=True):
        assert rel(y, ref(x, *ws)) < 1e-2


def test_moe_replays_match_reference() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    e, h, i, t, k = 8, 256, 256, 2, 3
    w = dict(
        w13=pack_int4(torch.randint(-8, 8, (e, 2 * i, h), generator=g, device="cuda", dtype=torch.int32)),
        w2=pack_int4(torch.randint(-8, 8, (e, h, i), generator=g, device="cuda", dtype=torch.int32)),
        w13_scale=(0.01 + 0.01 * torch.rand(e, 2 * i, h // 128, generator=g, device="cuda")).to(torch.bfloat16),
        w2_scale=(0.01 + 0.01 * torch.rand(e, h, i // 128, generator=g, device="cuda")).to(torch.bfloat16),
    )
    calls = []
    for _ in range(4):  # new tokens and new routing every call
        x = torch.randn(t, h, generator=g, device="cuda", dtype=torch.bfloat16)
        ids = torch.rand(t, e, generator=g, device="cuda").topk(k, dim=-1).indices
        tw = torch.softmax(torch.randn(t, k, generator=g, device="cuda"), -1)
        calls.append((x, ids, tw))
    before = _graphs.cached()
    outs = [moe_experts(x, ids, tw, **w) for x, ids, tw in calls]
    assert _graphs.cached() == before + 1
    for (x, ids, tw), y in zip(calls, outs, strict=True):
        assert rel(y, moe_experts_ref(x, ids, tw, **w)) < 1e-2


def test_no_graph_inside_a_callers_capture_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    (w, s), op, ref = _weights("w4a16", g)
    x = torch.randn(3, 512, generator=g, device="cuda", dtype=torch.bfloat16)
    op(x, w, s)  # compile and tune outside the capture
    before = _graphs.cached()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(3):
            y = op(x, w, s)
    graph.replay()
    assert _graphs.cached() == before
    assert rel(y, ref(x, w, s)) < 1e-2
    monkeypatch.setenv("SQUEEZE_KERNELS_NO_GRAPHS", "1")
    for _ in range(3):
        op(x[:2], w, s)
    assert _graphs.cached() == before
