"""The split-K reduction kernel: sum of the fp32 partials, cast once, into any [M, N] view."""

from __future__ import annotations

import pytest
import torch

from squeeze.kernels import _splitk
from tests.conftest_kernels import DEVICE, poisoned, randn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sum_splits_matches_torch_into_a_strided_view(dtype: torch.dtype) -> None:
    ws = randn(3, 5, 1100, dtype=torch.float32, seed=1) * 100.0  # more than one 1024-element block
    out = poisoned(1100, 5, dtype=dtype).t()  # [5, 1100] with strides (1, 5)
    _splitk.finish(out, ws.to(DEVICE), 3)
    want = ws.sum(0).to(dtype)  # fp32 sum, one round-to-nearest-even cast, as the kernel does
    assert torch.equal(out.cpu(), want)
