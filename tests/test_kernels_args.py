"""Bad arguments to the kernel entry points fail with one ValueError that names the problem, before any
kernel could read past a buffer (on the GPU a disagreeing K or a short scale tensor is an out-of-bounds read)."""

from __future__ import annotations

import pytest
import torch

from squeeze.kernels import linear_fp8_block, linear_w4a16, linear_w8a8, moe_experts, pack_int4

N, K = 64, 256


def w4() -> dict:
    return dict(weight=pack_int4(torch.randint(-8, 8, (N, K), dtype=torch.int32)),
                scale=torch.rand(N, K // 128).to(torch.bfloat16))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=torch.randn(2, 128, dtype=torch.bfloat16)), r"takes K = 256"),
        (dict(weight=torch.randn(N, K // 8)), r"int32 \[N, K/8\]"),
        (dict(scale=torch.rand(N, 1).to(torch.bfloat16)), r"scale must be \[64, 2\]"),
        (dict(zero_point=torch.zeros(N, 4, dtype=torch.int32)), r"zero_point must be \[64, 2\]"),
        (dict(group_size=96), r"divisor of K=256"),
        (dict(x=torch.randn(2, K), backend="triton"), r"bfloat16 or float16"),
        (dict(x=torch.ones(2, K, dtype=torch.int32)), r"floating point"),
    ],
)
def test_w4a16_rejects(change: dict, match: str) -> None:
    args = dict(x=torch.randn(2, K, dtype=torch.bfloat16), **w4(), zero_point=None, group_size=128) | change
    with pytest.raises(ValueError, match=match):
        linear_w4a16(**args)


def test_w4a16_fp32_activations_still_run_on_the_reference() -> None:
    """The 16-bit restriction is the Triton kernels'; the torch path keeps taking fp32 (CPU models)."""
    out = linear_w4a16(torch.randn(2, K), **w4(), zero_point=None, group_size=128, backend="torch")
    assert out.shape == (2, N) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(weight=torch.randn(N, K)), r"float8_e4m3fn"),
        (dict(scale_inv=torch.rand(1, 1)), r"\[1, 2\]"),
        (dict(x=torch.randn(3, K + 1)), r"takes K = 256"),
    ],
)
def test_fp8_block_rejects(change: dict, match: str) -> None:
    args = dict(x=torch.randn(3, K), weight=torch.randn(N, K).to(torch.float8_e4m3fn), scale_inv=torch.rand(1, 2))
    with pytest.raises(ValueError, match=match):
        linear_fp8_block(**(args | change))


@pytest.mark.parametrize(
    "change,match",
    [(dict(weight=torch.zeros(N, K, dtype=torch.int32)), r"int8 \[N, K\]"),
     (dict(weight_scale=torch.rand(N // 2)), r"one scale per output channel \(64\)")],
)
def test_w8a8_rejects(change: dict, match: str) -> None:
    args = dict(x=torch.randn(3, K), weight=torch.zeros(N, K, dtype=torch.int8), weight_scale=torch.rand(N, 1))
    with pytest.raises(ValueError, match=match):
        linear_w8a8(**(args | change))


def moe_args(fmt: str) -> dict:
    e, h, i = 4, 128, 64
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    base = dict(x=torch.randn(3, h, dtype=torch.bfloat16), topk_ids=ids, topk_weights=torch.rand(3, 2))
    if fmt == "int4":
        return base | dict(w13=pack_int4(torch.randint(-8, 8, (e, 2 * i, h), dtype=torch.int32)),
                           w2=pack_int4(torch.randint(-8, 8, (e, h, i), dtype=torch.int32)),
                           w13_scale=torch.rand(e, 2 * i, 1), w2_scale=torch.rand(e, h, 1), group_size=-1)
    if fmt == "fp8":
        return base | dict(w13=torch.randn(e, 2 * i, h).to(torch.float8_e4m3fn),
                           w2=torch.randn(e, h, i).to(torch.float8_e4m3fn),
                           w13_scale=torch.rand(e, 2, 1), w2_scale=torch.rand(e, 1, 1))
    bf16 = dict(dtype=torch.bfloat16)
    return base | dict(w13=torch.randn(e, 2 * i, h, **bf16), w2=torch.randn(e, h, i, **bf16))


@pytest.mark.parametrize(
    "fmt,change,match",
    [
        ("bf16", dict(x=torch.randn(128, dtype=torch.bfloat16)), r"x must be \[T, hidden\]"),
        ("bf16", dict(topk_ids=torch.rand(3, 2)), r"topk_ids must be integer \[T = 3, k\]"),
        ("bf16", dict(topk_weights=torch.rand(3, 3)), r"topk_weights must be \[3, 2\]"),
        ("bf16", dict(w2=torch.randn(4, 96, 64, dtype=torch.bfloat16)), r"w13 \[E, 2I, H\] and w2 \[E, H, I\]"),
        ("int4", dict(w13_scale=None), r"w13_scale must be \[4, 128, 1\].*none"),
        ("int4", dict(w2_zero_point=torch.zeros(4, 128, 2, dtype=torch.int32)), r"w2_zero_point must be \[4, 128, 1\]"),
        ("fp8", dict(w2_scale=torch.rand(4, 1, 2)), r"w2_scale must be \[4, 1, 1\]"),
    ],
)
def test_moe_rejects(fmt: str, change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        moe_experts(**(moe_args(fmt) | change))


@pytest.mark.parametrize("fmt", ["bf16", "int4", "fp8"])
def test_moe_accepts_the_documented_layouts(fmt: str) -> None:
    """The checks pass every format's documented shapes (the reference then runs)."""
    out = moe_experts(**moe_args(fmt))
    assert out.shape == (3, 128) and torch.isfinite(out.float()).all()
