"""Learning-rate schedules: linear warmup, then cosine, linear or constant decay."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Warmup rises linearly from 1/warmup to 1 over ``warmup_steps`` steps; then
    ``cosine`` and ``linear`` decay to ``min_ratio`` at ``total_steps`` and
    ``constant`` stays at 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose cosine, linear or constant")
    return min_ratio + (1.0 - min_ratio) * shape
