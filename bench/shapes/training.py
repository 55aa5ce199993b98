"""What the world's own trainers (teacher, evaluators) share and no distillation method uses."""

from __future__ import annotations

import math


def warmup_cosine(warmup: int, total: int, floor: float = 0.1):
    """LR multiplier at a step: linear warm-up over `warmup` steps, then cosine decay to `floor` at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    return f
