"""Helpers for the Triton kernel tests (imported by tests/test_kernels_*.py; not a pytest conftest).

tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU before any kernel is defined, so
these tests run the kernels under Triton's CPU interpreter in CI and compiled on a GPU machine.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")

# ||out - ref|| / ||ref|| bounds: one bf16 / fp16 rounding of the output, with margin.
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error in float64; NaN (e.g. an unwritten poisoned element) never passes."""
    out, ref = out.double().cpu(), ref.double().cpu()
    err = ((out - ref).norm() / ref.norm()).item()
    return float("inf") if err != err else err


def poisoned(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer full of NaN, so any element a kernel forgets to write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0, std: float = 1.0) -> torch.Tensor:
    """Random normal data (never zeros: zeros hide unwritten outputs and wrong indexing)."""
    return (torch.randn(*shape, generator=gen(seed)) * std).to(dtype).to(DEVICE)


def randint(low: int, high: int, *shape: int, dtype: torch.dtype = torch.int8, seed: int = 0) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=gen(seed)).to(dtype).to(DEVICE)


def rand_scale(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, lo: float = 0.005) -> torch.Tensor:
    """Positive scales in [lo, 3 lo): varied per group so a wrong group index shows up."""
    return (lo * (1 + 2 * torch.rand(*shape, generator=gen(seed)))).to(dtype).to(DEVICE)
