"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math


def lr_factor(step: int, steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to `min_ratio`, or DeepSeek's step decay (×0.316 at 80%, 90%)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        return 1.0 if step < 0.8 * steps else (0.316 if step < 0.9 * steps else 0.316**2)
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
