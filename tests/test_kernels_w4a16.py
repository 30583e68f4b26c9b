"""W4A16 / W8A16 dequant-GEMM against the torch reference (and compressed-tensors' packing)."""

from __future__ import annotations

import pytest
import torch

from squeeze.kernels import dequantize_weight, linear_w4a16, linear_w8a16, pack_int4
from squeeze.kernels.reference import linear_wq_ref
from squeeze.kernels.w4a16 import WqConfig, dequantize_to, launch_wq
from tests.conftest_kernels import DEVICE, TOL, poisoned, rand_scale, randint, randn, rel_err

# (M, N, K, group, zero point, dtype, bits): M=1 and M>1, N and K on and off the block sizes.
CASES = [
    (1, 40, 256, 128, False, torch.bfloat16, 4),
    (1, 72, 200, -1, True, torch.float16, 4),
    (7, 96, 256, 64, True, torch.bfloat16, 4),
    (33, 50, 128, 32, False, torch.bfloat16, 4),
    (3, 64, 192, 32, True, torch.bfloat16, 8),
    (18, 24, 136, -1, False, torch.float16, 8),
]


def make(m: int, n: int, k: int, group: int, zp: bool, dtype: torch.dtype, bits: int, seed: int = 0):
    groups = 1 if group == -1 else k // group
    q = randint(-8, 8, n, k, seed=seed + 1) if bits == 4 else randint(-128, 128, n, k, seed=seed + 1)
    w = pack_int4(q) if bits == 4 else q
    scale = rand_scale(n, groups, dtype=dtype, seed=seed + 2)
    zero = randint(-3, 4, n, groups, seed=seed + 3) if zp else None
    return randn(m, k, dtype=dtype, seed=seed), w, scale, zero


def case_id(c: tuple) -> str:
    return "M{}_N{}_K{}_g{}_zp{}_{}_int{}".format(*c[:5], str(c[5]).removeprefix("torch."), c[6])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_linear_matches_reference(case) -> None:
    m, n, k, group, zp, dtype, bits = case
    x, w, scale, zero = make(*case)
    ref = linear_wq_ref(x.cpu(), w.cpu(), scale.cpu(), None if zero is None else zero.cpu(), group)
    fn = linear_w4a16 if bits == 4 else linear_w8a16
    out = fn(x, w, scale, zero, group, backend="triton")
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize(
    "cfg",
    [
        WqConfig(16, 32, 32, 4, 1, split_k=3),
        WqConfig(32, 64, 64, 4, 1),
        WqConfig(16, 32, 64, 4, 1, unpack=1),
        WqConfig(16, 64, 128, 4, 1, split_k=2, unpack=2),
        WqConfig(dequant_cublas=True),
        WqConfig(1, 32, 128, 4, 1, split_k=3, gemv=True, ng=1),
        WqConfig(1, 16, 128, 4, 1, split_k=2, gemv=True, ng=2),
        WqConfig(16, 32, 32, 4, 1, split_k=2, prefetch=True),
    ],
    ids=["splitk3", "bm32_bn64", "join_unpack", "permuted_k_splitk2", "dequant_then_matmul", "gemv_splitk3",
         "gemv_splitk2", "prefetch_splitk2"],
)
@pytest.mark.parametrize("m,group,k", [(1, 128, 512), (37, 64, 512), (3, -1, 200)])
def test_every_strategy_writes_every_element(cfg: WqConfig, m: int, group: int, k: int) -> None:
    x, w, scale, zero = make(m, 80, k, group, True, torch.bfloat16, 4, seed=m)
    out = launch_wq(x, w, scale, zero, group, cfg, out=poisoned(m, 80, dtype=torch.bfloat16))
    ref = linear_wq_ref(x.cpu(), w.cpu(), scale.cpu(), zero.cpu(), group)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize(
    "n,k,group,zp,dtype,ng,split",
    [
        (80, 512, 128, True, torch.bfloat16, 4, 0),
        (72, 200, -1, False, torch.float16, 2, 0),  # K off the step, per channel
        (50, 384, 32, True, torch.bfloat16, 2, 2),  # small groups, split-K
        (40, 1280, 128, False, torch.bfloat16, 4, 0),  # last step half full
        (33, 1024, 64, False, torch.float16, 1, 3),
    ],
)
def test_phase_gemv(n: int, k: int, group: int, zp: bool, dtype: torch.dtype, ng: int, split: int) -> None:
    """The M = 1 nibble-phase GEMV (gemv.w4_gemv_phase_kernel) on random data, N and K off its blocks."""
    x, w, scale, zero = make(1, n, k, group, zp, dtype, 4, seed=n)
    x = x * 3.0  # values far from 1 so an offset error shows
    cfg = WqConfig(1, 16, 128, 4, 1, split_k=split, gemv=True, ng=ng)
    out = launch_wq(x, w, scale, zero, group, cfg, out=poisoned(1, n, dtype=dtype))
    ref = linear_wq_ref(x.cpu(), w.cpu(), scale.cpu(), None if zero is None else zero.cpu(), group)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("bits,zp", [(4, True), (4, False), (8, True)])
def test_dequantize_kernel_exact(bits: int, zp: bool) -> None:
    _, w, scale, zero = make(1, 48, 192, 64, zp, torch.float32, bits, seed=7)
    out = dequantize_to(w, scale, zero, 64, torch.float32)
    assert rel_err(out, dequantize_weight(w.cpu(), scale.cpu(), None if zero is None else zero.cpu(), 64)) < 1e-6


def test_batched_input_and_torch_backend() -> None:
    x, w, scale, zero = make(6, 40, 256, 128, True, torch.bfloat16, 4, seed=3)
    x3 = x.reshape(2, 3, 256)
    fast = linear_w4a16(x3, w, scale, zero, 128, backend="triton")
    slow = linear_w4a16(x3, w, scale, zero, 128, backend="torch")
    assert fast.shape == slow.shape == (2, 3, 40)
    assert rel_err(fast, slow) < TOL[torch.bfloat16]


def test_auto_backend_uses_reference_on_cpu() -> None:
    x, w, scale, _ = make(2, 16, 64, 32, False, torch.bfloat16, 4, seed=4)
    out = linear_w4a16(x.cpu(), w.cpu(), scale.cpu(), None, 32)
    assert torch.equal(out, linear_wq_ref(x.cpu(), w.cpu(), scale.cpu(), None, 32))
    assert DEVICE.type in ("cpu", "cuda")
