"""W8A8-INT8 GEMM with dynamic per-token activation scales against the reference."""

from __future__ import annotations

import pytest
import torch

from squeeze.kernels import linear_w8a8
from squeeze.kernels.reference import linear_w8a8_ref, quant_int8_act_ref
from squeeze.kernels.w8a8 import W8A8Config, launch_w8a8, quant_int8_act
from tests.conftest_kernels import TOL, poisoned, rand_scale, randint, randn, rel_err


def make(m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    x = randn(m, k, dtype=dtype, seed=seed)
    w = randint(-127, 128, n, k, seed=seed + 1)
    return x, w, rand_scale(n, 1, seed=seed + 2, lo=0.001)


@pytest.mark.parametrize("m,k", [(1, 256), (6, 3000), (3, 136)])
def test_act_quant_matches_reference(m: int, k: int) -> None:
    x = randn(m, k, seed=k, std=2.0)
    q, s = quant_int8_act(x)
    q_ref, s_ref = quant_int8_act_ref(x.cpu())
    assert torch.allclose(s.cpu(), s_ref, rtol=1e-6, atol=0)
    assert (q.cpu().int() - q_ref.int()).abs().max().item() <= 1
    assert (q.cpu() != q_ref).float().mean().item() < 1e-3


@pytest.mark.parametrize(
    "m,n,k,dtype",
    [(1, 40, 256, torch.bfloat16), (1, 200, 300, torch.bfloat16), (5, 130, 128, torch.float16),
     (33, 72, 384, torch.bfloat16)],
)
def test_linear_matches_reference(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    x, w, s = make(m, n, k, dtype, seed=m + n)
    out = linear_w8a8(x, w, s, backend="triton")
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, linear_w8a8_ref(x.cpu(), w.cpu(), s.cpu())) < TOL[dtype]


@pytest.mark.parametrize(
    "cfg", [W8A8Config(16, 32, 32, 4, 1, split_k=3), W8A8Config(32, 64, 64, 4, 1)], ids=["splitk3", "bm32"]
)
@pytest.mark.parametrize("m", [1, 37])
def test_every_strategy_writes_every_element(cfg: W8A8Config, m: int) -> None:
    x, w, s = make(m, 80, 320, seed=m)
    q, qs = quant_int8_act(x)
    out = launch_w8a8(q, qs, w, s, cfg, torch.bfloat16, out=poisoned(m, 80, dtype=torch.bfloat16))
    assert rel_err(out, linear_w8a8_ref(x.cpu(), w.cpu(), s.cpu())) < TOL[torch.bfloat16]
