"""Layer-by-layer execution: peak memory is flat in depth (16 layers vs 4 of the same size)."""

from __future__ import annotations

import pytest

from squeeze.evaluation.bench_memory import measure


@pytest.mark.slow
def test_peak_rss_flat_in_depth() -> None:
    # Layers big enough (~50 MiB fp32 each) that holding all 16 would push the ratio far past 2.
    r = measure(hidden=512, experts=16, moe_inter=512)
    assert r["disk_mib_16"] > 3.5 * r["disk_mib_4"]
    assert r["ratio"] <= 1.3, r
