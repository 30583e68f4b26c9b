"""Quantizing is flat in peak memory with depth (16-layer vs 4-layer random toy of the same layer size)."""

from __future__ import annotations

import pytest

from squeeze.quant.bench_memory import measure


@pytest.mark.slow
def test_quantize_peak_rss_flat_in_depth() -> None:
    r = measure(hidden=512, experts=16, moe_inter=512, method="gptq")  # ~50 MiB fp32 layers
    assert r["disk_mib_16"] > 3.5 * r["disk_mib_4"]
    assert r["ratio"] <= 1.3, r
