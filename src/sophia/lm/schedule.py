"""When things happen in a run: the learning-rate schedule and the periodic actions (logging, evaluation,
checkpoints), counted in completed steps."""

from __future__ import annotations

import math
from typing import Any


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up to lr, cosine decay to min_lr at decay_steps, then min_lr (``step`` 0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= cfg.decay_steps:
        return cfg.min_lr
    span = max(1, cfg.decay_steps - cfg.warmup_steps)
    ratio = (step - cfg.warmup_steps) / span
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def due(step: int, every: int, max_steps: int) -> bool:
    """Whether an action done every ``every`` steps is due after completed step ``step``: at its multiples and
    always at the run's last step.

    >>> [s for s in range(1, 11) if due(s, every=4, max_steps=10)]
    [4, 8, 10]
    """
    return step % every == 0 or step == max_steps


__all__ = ["due", "lr_at"]
