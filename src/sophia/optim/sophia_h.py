"""SophiaH: Sophia with a Hutchinson Hessian estimate that the optimizer refreshes itself."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from sophia.hessian.hutchinson import hutchinson_from_grads
from sophia.hessian.probes import check_distribution
from sophia.optim.base import SophiaBase


class SophiaH(SophiaBase):
    r"""Sophia with Hutchinson's diagonal Hessian estimate (Liu et al., 2023, Algorithm 1).

    .. code-block:: text

        step t (t = 1, 2, ...):
            if t - 1 is a positive multiple of hessian_interval:       # t = k+1, 2k+1, ...
                u ~ Rademacher or N(0, I);  h = b2*h + (1-b2) * u * (H u)
            m = b1*m + (1-b1)*g
            p = p - lr*weight_decay*p
            p = p - lr*clip(m / max(rho*h, eps), 1)

    The estimate is folded into the EMA on the step that computes it and used by that same
    step. The first ``update_period`` steps have ``h = 0``: sign-momentum steps, as in SophiaG
    under the authors' schedule. Hutchinson estimates can be negative; ``max(rho*h, eps)``
    turns those coordinates into sign steps. With ``maximize=True`` the curvature of the
    negated objective is used.

    Two ways to supply the Hessian-vector product on a refresh step
    (:meth:`hessian_due` says whether the next step is one):

    1. ``loss.backward(create_graph=True)`` before ``step()``: the optimizer differentiates the
       gradients once more. Call ``zero_grad(set_to_none=True)`` after the step: a gradient
       that carries its graph holds a reference cycle that keeps memory alive.
    2. No second-order graph: compute the estimate with
       :func:`sophia.hessian.hutchinson` (double backward inside the call, or
       forward-over-reverse with ``torch.func``) and pass it to
       ``update_hessian(estimates=...)`` before ``step()``; the step then uses it and does
       not estimate again.

    On a refresh step that has neither, ``step()`` raises ``RuntimeError`` and changes nothing.

    Args:
        params, lr, betas, rho, weight_decay, eps, maximize, foreach, fused, cuda_graph: as in
            :class:`~sophia.SophiaG` (its step between refreshes is SophiaG's: on CPU the C++ kernel by default).
        hessian_interval: k, the number of steps between Hessian refreshes (as SophiaG's).
        update_period: the former name of ``hessian_interval``; accepted with a DeprecationWarning (and
            state dicts and param groups that use it are read as ``hessian_interval``).
        distribution: ``"rademacher"`` (default) or ``"gaussian"`` probes.
        generator: optional ``torch.Generator`` for the probes (default: the global RNG).

    Example:
        >>> import torch
        >>> from sophia import SophiaH
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> opt = SophiaH(model.parameters(), lr=1e-3, rho=0.01, hessian_interval=5)
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> for _ in range(11):
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward(create_graph=opt.hessian_due())
        ...     opt.step(); opt.zero_grad(set_to_none=True)
        >>> opt.diagnostics()["hessian_updates"]
        2
    """

    _kind = "SophiaH"
    _PICKLED = {**SophiaBase._PICKLED, "generator": None}

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.01,
        weight_decay: float = 1e-1,
        *,
        eps: float = 1e-15,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | str | None = None,
        cuda_graph: bool = False,
        hessian_interval: int = 10,
        distribution: str = "rademacher",
        generator: torch.Generator | None = None,
        update_period: int | None = None,
    ) -> None:
        if update_period is not None:
            if hessian_interval != 10 and hessian_interval != update_period:
                raise ValueError(f"SophiaH: update_period={update_period!r} and hessian_interval={hessian_interval!r} "
                                 "disagree; update_period is the old name of hessian_interval: give only that")
            warnings.warn("SophiaH(update_period=...) is now hessian_interval=... (as SophiaG's); the old name "
                          "will go", DeprecationWarning, stacklevel=2)
            hessian_interval = update_period
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps,
                        maximize=maximize, foreach=foreach, fused=fused, cuda_graph=cuda_graph,
                        hessian_interval=hessian_interval, distribution=distribution)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"SophiaH: generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self._supplied: set[int] = set()
        super().__init__(params, defaults)

    def _validate_hyperparameters(self, group: Mapping[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        _validate_h(group)

    def _group_setdefaults(self) -> dict[str, Any]:
        return {**super()._group_setdefaults(), "distribution": "rademacher"}

    def _upgrade_group(self, group: Mapping[str, Any]) -> dict[str, Any]:
        group = dict(group)
        if "update_period" in group:  # saved before the rename
            old = group.pop("update_period")
            group.setdefault("hessian_interval", old)
        return group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and "update_period" in param_group:
            warnings.warn("a SophiaH param group's update_period is now hessian_interval", DeprecationWarning,
                          stacklevel=2)
            if "hessian_interval" in param_group and param_group["hessian_interval"] != param_group["update_period"]:
                raise ValueError("SophiaH: a param group gives update_period and hessian_interval, which disagree; "
                                 "update_period is the old name of hessian_interval: give only that")
            param_group = self._upgrade_group(param_group)
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # estimates supplied for the next step, by position: a copy's parameters are other objects
        state["_supplied_at"] = [(i, j) for i, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])
                                 if id(p) in self._supplied]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        supplied_at = state.pop("_supplied_at", [])
        super().__setstate__(state)
        self._supplied = {id(self.param_groups[i]["params"][j]) for i, j in supplied_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._supplied = set()

    def _due(self, group: dict[str, Any], p: Tensor, steps_ahead: int = 0) -> bool:
        state = self.state.get(p)
        done = (int(state["step"].item()) if state and "step" in state else 0) + steps_ahead
        k = group["hessian_interval"]
        return done > 0 and done % k == 0

    def hessian_due(self, steps_ahead: int = 0) -> bool:
        """Whether the next ``step()`` refreshes the Hessian estimate of some parameter (after steps k, 2k, ...,
        as SophiaG's); ``steps_ahead=1``: the step after it."""
        return any(self._due(g, p, steps_ahead) for g in self.param_groups for p in g["params"])

    def update_hessian(self, bs: int | None = None, *, estimates=None) -> None:  # noqa: D102
        if estimates is not None and bs is None:
            self._check_groups()
            resolved = self._resolve_estimates(estimates)  # once: validated, then folded
            self._fold_estimates(resolved)
            self._supplied.update(id(p) for p in resolved)
            return
        super().update_hessian(bs, estimates=estimates)
        self._supplied.update(id(p) for g in self.param_groups for p in self._params_with_grad(g))

    update_hessian.__doc__ = SophiaBase.update_hessian.__doc__

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one step, refreshing the Hutchinson estimate first when it is due."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._groups_with_grads()
        due = [(g, p) for g, ps in work for p in ps if self._due(g, p) and id(p) not in self._supplied]
        if due:
            self._refresh(due)
        for group, params in work:
            self._update_group(group, params)
        if any(params for _, params in work):
            self._steps += 1
        self._supplied = set()
        return loss

    def _refresh(self, due: list[tuple[dict[str, Any], Tensor]]) -> None:
        grads = [p.grad for _, p in due]
        if not any(g.requires_grad for g in grads):
            raise RuntimeError(
                f"{type(self).__name__}: this step refreshes the Hessian estimate, but the "
                "gradients carry no graph to differentiate again. Either the backward ran without "
                "create_graph=True (call loss.backward(create_graph=True) on the steps where "
                "opt.hessian_due() is True), or the loss is linear in these parameters, so that its "
                "gradient does not depend on them and the Hessian is zero (then Sophia's curvature "
                "scaling has nothing to work with: use SophiaG, or pass the estimate yourself). Or "
                "compute the estimate with sophia.hessian.hutchinson(loss_fn, params) and pass it to "
                "opt.update_hessian(estimates=...) before step(). Nothing was changed.")
        estimates: dict[Tensor, Tensor] = {}
        by_dist: dict[str, list[tuple[dict[str, Any], Tensor]]] = {}
        for g, p in due:
            by_dist.setdefault(g["distribution"], []).append((g, p))
        for distribution, items in by_dist.items():
            ps = [p for _, p in items]
            est = hutchinson_from_grads([p.grad for p in ps], ps, distribution=distribution,
                                        generator=self.generator,
                                        retain_graph=len(by_dist) > 1)
            for (g, p), e in zip(items, est):
                estimates[p] = e.neg_() if g["maximize"] else e
        self._fold_estimates(estimates)


def _validate_h(group: Mapping[str, Any]) -> None:
    check_distribution(group["distribution"])


__all__ = ["SophiaH"]
