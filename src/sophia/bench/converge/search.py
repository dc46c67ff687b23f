"""The tuning search of one optimizer, as a pure function of the runs that have finished.

Given the final validation loss of every finished setting, :meth:`TuningSearch.progress` says where the
tuning stands and which settings come next:

1. ``"lr"``: the lr grid at seed 0; while the best lr sits at an edge of the grid (and the grid has more than
   one point), one more point beyond that edge (half the lowest, twice the highest), at most ``max_extend``
   times;
2. ``"rho"``: for Sophia only, the other rhos of the grid at the best lr (the lr grid ran the default rho);
   the best of the default and the grid is kept, the default winning ties;
3. ``"seeds"``: the chosen setting at the fresh seeds 1 .. ``seeds``;
4. ``"done"``.

The decisions are replayed from the start on every call, so a sweep continued from its folder (however many
runs had finished) asks for exactly the settings an uninterrupted one would. A diverged run scores
``math.inf``, so it never wins (ties go to the lower lr). Nothing here runs, reads or writes anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sophia.bench.converge.spec import Setting, is_sophia

PHASES = ("lr", "rho", "seeds", "done")


@dataclass(frozen=True)
class Progress:
    """Where one optimizer's tuning stands: the phase, the settings of that phase without a result yet (to run
    next; empty when ``done``), the lr grid as grown so far, and the chosen ``(lr, rho)`` once the lr (and for
    Sophia the rho) is decided, else None."""

    phase: str
    pending: tuple[Setting, ...]
    lrs: tuple[float, ...]
    chosen: tuple[float, float | None] | None


@dataclass(frozen=True)
class TuningSearch:
    """One optimizer's tuning procedure (module docstring): settings out, given final losses in.

    ``lrs`` is the starting grid, ``rho`` the default rho (None for an optimizer without one: no rho phase),
    ``rhos`` the rho grid, ``seeds`` the number of fresh seeds and ``max_extend`` how often the lr grid may
    grow.

    >>> search = TuningSearch("adamw", lrs=(1e-3, 2e-3), rho=None, rhos=(), seeds=2, max_extend=1)
    >>> [s.name for s in search.next_settings({})]
    ['adamw-lr0.001-s0', 'adamw-lr0.002-s0']
    >>> scores = {Setting("adamw", 1e-3, None, 0): 3.1, Setting("adamw", 2e-3, None, 0): 3.0}
    >>> [s.name for s in search.next_settings(scores)]  # the best is the top edge: one more lr above it
    ['adamw-lr0.004-s0']
    >>> scores[Setting("adamw", 4e-3, None, 0)] = 3.2
    >>> p = search.progress(scores)
    >>> p.phase, p.chosen, [s.name for s in p.pending]
    ('seeds', (0.002, None), ['adamw-lr0.002-s1', 'adamw-lr0.002-s2'])
    """

    optimizer: str
    lrs: tuple[float, ...]
    rho: float | None
    rhos: tuple[float, ...]
    seeds: int
    max_extend: int

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], optimizer: str) -> TuningSearch:
        """The search ``spec`` (a sweep's ``sweep.json``) sets for ``optimizer``."""
        rho = spec["default_rho"][optimizer] if is_sophia(optimizer) else None
        return cls(optimizer, tuple(spec["lrs"][optimizer]), rho, tuple(spec["rhos"]), spec["seeds"],
                   spec["max_extend"])

    def progress(self, scores: Mapping[Setting, float]) -> Progress:
        """Replay the decisions over ``scores`` (each finished setting's final validation loss, ``math.inf`` when
        it diverged; other optimizers' settings are ignored) up to the first phase with settings to run."""
        opt, rho = self.optimizer, self.rho

        def missing(settings: list[Setting]) -> tuple[Setting, ...]:
            return tuple(s for s in settings if s not in scores)

        def score(lr: float, r: float | None) -> float:
            return scores[Setting(opt, lr, r, 0)]

        lrs = sorted(self.lrs)
        batch = [Setting(opt, lr, rho, 0) for lr in lrs]
        extended = 0
        while True:
            todo = missing(batch)
            if todo:
                return Progress("lr", todo, tuple(lrs), None)
            best = min(lrs, key=lambda lr: score(lr, rho))
            if extended < self.max_extend and best in (lrs[0], lrs[-1]) and len(lrs) > 1:
                new = best / 2 if best == lrs[0] else best * 2
                lrs = sorted(lrs + [new])
                extended += 1
                batch = [Setting(opt, new, rho, 0)]
                continue
            break
        if rho is not None:
            todo = missing([Setting(opt, best, r, 0) for r in self.rhos if r != rho])
            if todo:
                return Progress("rho", todo, tuple(lrs), None)
            rho = min([rho, *self.rhos], key=lambda r: score(best, r))
        chosen = (best, rho)
        todo = missing([Setting(opt, best, rho, seed) for seed in range(1, self.seeds + 1)])
        if todo:
            return Progress("seeds", todo, tuple(lrs), chosen)
        return Progress("done", (), tuple(lrs), chosen)

    def next_settings(self, scores: Mapping[Setting, float]) -> list[Setting]:
        """The settings to run next (those of the current phase without a result), in order; [] when done."""
        return list(self.progress(scores).pending)
