"""The learning-rate schedule: linear warmup, then cosine, linear or constant decay to a floor."""

from __future__ import annotations

import math
from typing import Callable

from nested_learning.config import ScheduleConfig

__all__ = ["lr_lambda"]


def lr_lambda(cfg: ScheduleConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr for optimizer step ``i + 1`` (``i`` steps taken): linear warmup, then decay."""
    warmup, total, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        decay = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}
        return floor + (1.0 - floor) * decay[cfg.kind]

    return factor
