"""Block-FP8 GEMM (DeepSeek-V3 scheme) and its activation quantization against the reference."""

from __future__ import annotations

import pytest
import torch

from squeeze.kernels import linear_fp8_block
from squeeze.kernels.fp8_block import Fp8Config, launch_fp8_block, quant_fp8_act
from squeeze.kernels.reference import linear_fp8_block_ref, quant_fp8_act_ref
from tests.conftest_kernels import TOL, poisoned, rand_scale, randn, rel_err


def make(m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    x = randn(m, k, dtype=dtype, seed=seed)
    w = randn(n, k, dtype=torch.float32, seed=seed + 1).to(torch.float8_e4m3fn)
    scale_inv = rand_scale(-(-n // 128), -(-k // 128), seed=seed + 2, lo=0.001)
    return x, w, scale_inv


@pytest.mark.parametrize("m,k", [(1, 256), (5, 300), (40, 128), (3, 136)])
def test_act_quant_matches_reference(m: int, k: int) -> None:
    x = randn(m, k, seed=k, std=3.0)
    q, s = quant_fp8_act(x)
    q_ref, s_ref = quant_fp8_act_ref(x.cpu())
    assert torch.allclose(s.T.cpu(), s_ref, rtol=1e-6, atol=0)
    mismatched = (q.float().cpu() != q_ref.float()).float().mean().item()
    assert mismatched < 1e-3  # identical up to a rare last-ulp rounding tie


@pytest.mark.parametrize(
    "m,n,k,dtype",
    [(1, 40, 256, torch.bfloat16), (1, 200, 300, torch.bfloat16), (5, 130, 128, torch.float16),
     (33, 72, 384, torch.bfloat16), (17, 256, 200, torch.bfloat16)],
)
def test_linear_matches_reference(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    x, w, s = make(m, n, k, dtype, seed=m + n)
    out = linear_fp8_block(x, w, s, backend="triton")
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, linear_fp8_block_ref(x.cpu(), w.cpu(), s.cpu())) < TOL[dtype]


@pytest.mark.parametrize(
    "cfg",
    [
        Fp8Config(16, 32, 4, 1, split_k=3),
        Fp8Config(32, 64, 4, 1),
        Fp8Config(16, 64, 4, 1, 2, fuse_quant=True),
        Fp8Config(1, 16, 4, 1, split_k=2, gemv=True),
        Fp8Config(1, 16, 4, 3, split_k=2, gemv=True, nb=2),
        Fp8Config(1, 32, 4, 2, gemv=True, nb=1),
        Fp8Config(cublas=True),  # no cuBLAS block-fp8 here (CPU / K % 512): falls back to the Triton GEMM
    ],
    ids=["splitk3", "bm32", "fused_quant_splitk2", "gemv_splitk2", "tma_gemv_splitk2", "tma_gemv",
         "cublas_or_fallback"],
)
@pytest.mark.parametrize("m,k", [(1, 640), (1, 200), (37, 640), (5, 200)])
def test_every_strategy_writes_every_element(cfg: Fp8Config, m: int, k: int) -> None:
    x, w, s = make(m, 144, k, seed=m)
    out = launch_fp8_block(x, w, s, cfg, out=poisoned(m, 144, dtype=torch.bfloat16))
    assert rel_err(out, linear_fp8_block_ref(x.cpu(), w.cpu(), s.cpu())) < TOL[torch.bfloat16]
