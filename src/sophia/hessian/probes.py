"""Random probe vectors for Hutchinson estimates: E[u u^T] = I."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DISTRIBUTIONS = ("rademacher", "gaussian")


def check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution


def rademacher_like(t: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Entries +1 or -1 with probability 1/2 each, shaped like ``t``."""
    # randint's upper bound is exclusive: (0, 2) draws {0, 1}, mapped to {-1, +1}.
    u = torch.randint(0, 2, t.shape, generator=generator, device=t.device, dtype=t.dtype)
    return u.mul_(2).sub_(1)


def gaussian_like(t: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal entries shaped like ``t``."""
    return torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)


def probes_like(tensors: Sequence[Tensor], distribution: str = "rademacher",
                generator: torch.Generator | None = None) -> list[Tensor]:
    """One probe per tensor, jointly a draw of u with E[u u^T] = I over all coordinates."""
    draw = rademacher_like if check_distribution(distribution) == "rademacher" else gaussian_like
    return [draw(t, generator) for t in tensors]
