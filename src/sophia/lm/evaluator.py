"""Evaluation: the mean validation loss over fixed batches, and the attention statistics beside it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from sophia.lm import parallel
from sophia.lm.distributed import Parallel


class Evaluator:
    """The validation loss over ``batches`` (the same windows at every evaluation) and, beside it, the
    per-layer largest attention logit and attention entropy on the first batch, with one warning the first
    time a logit passes ``attn_logit_warn`` (0: never)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], ranks: Parallel,
                 autocast: AbstractContextManager, *, attn_logit_warn: float = 0.0,
                 log: Callable[[str], None] = print) -> None:
        self.batches = batches
        self.ranks = ranks
        self.autocast = autocast
        self.attn_logit_warn = attn_logit_warn
        self.log = log
        self._warned = False

    @torch.no_grad()
    def loss(self, model: torch.nn.Module) -> float:
        """Mean loss over the fixed validation batches, split across ranks (rank r takes batches r, r+W, ...):
        the same mean as one process computes (a collective: every rank calls it). Under FSDP a forward is a
        collective too, so every rank runs as many forwards: a rank short of one repeats batch 0, uncounted."""
        device, rank, world = self.ranks.device, self.ranks.rank, self.ranks.world_size
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=device)
        n = len(self.batches)
        rounds = -(-n // world) if self.ranks.sharded else 0
        for k in range(max(rounds, -(-(n - rank) // world))):
            j = rank + k * world
            x, y = self.batches[j if j < n else 0]
            with self.autocast:
                _, loss = model(x.to(device), y.to(device))
            if j < n:
                total += loss.double()
        model.train()
        self.ranks.sum_(total)
        return (total / n).item()

    @torch.no_grad()
    def attention(self, gpt: torch.nn.Module) -> dict[str, Any]:
        """Per-layer largest attention logit and attention entropy on the first validation batch (one extra
        forward, on rank 0 only: every rank holds the same weights; under FSDP on every rank, with the weights
        gathered, a collective). Empty on the other ranks."""
        if not self.ranks.sharded and not self.ranks.main:
            return {}
        x = self.batches[0][0].to(self.ranks.device)
        gpt.eval()
        with parallel.unsharded(gpt) if self.ranks.sharded else nullcontext(), self.autocast:
            stats = gpt.attention_stats(x)
        gpt.train()
        if not self.ranks.main:
            return {}
        stats = {k: [round(v, 4) for v in vals] for k, vals in stats.items()}
        worst = max(stats["attn_max_logit"], default=0.0)
        if self.attn_logit_warn > 0 and worst > self.attn_logit_warn and not self._warned:
            self._warned = True
            self.log(f"warning: an attention logit reached {worst:,.0f} (above --attn-logit-warn "
                     f"{self.attn_logit_warn:g}): attention is saturating (entropy per layer "
                     f"{', '.join(f'{e:.2f}' for e in stats['attn_entropy'])} nats). "
                     "Remedies: --qk-norm, or a lower --lr")
        return stats


__all__ = ["Evaluator"]
