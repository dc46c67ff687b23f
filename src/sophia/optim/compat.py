"""Loading state saved by the authors' SophiaG (their sophia.py, also PyPI ``sophia-opt``)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch


def convert_authors_state_dict(state_dict: dict[str, Any], bs: int) -> dict[str, Any]:
    """Return a copy of an authors'-SophiaG ``state_dict`` that :class:`~sophia.SophiaG` loads.

    The authors keep ``hessian`` unscaled and multiply it by ``bs`` (the ``bs=`` they passed
    to ``step``, the number of tokens per estimate) at every step; sophia-lab folds that factor
    into ``hessian`` when the estimate is taken. So ``bs`` must be the value the run used
    (their GPT-2 scripts: ``480 * 1024``; their default: 5120). ``rho``, ``betas``, ``lr``
    and ``weight_decay`` carry over unchanged; ``eps`` gets sophia-lab's default 1e-15 (the
    authors add 1e-15 to the denominator where sophia-lab takes max(rho*h, 1e-15)).
    """
    if isinstance(bs, bool) or not isinstance(bs, (int, float)) or not bs > 0 or not math.isfinite(bs):
        raise ValueError(f"bs must be the positive batch size the authors' step(bs=...) used, got {bs!r}")
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or "state" not in state_dict:
        raise ValueError("not an optimizer state_dict: it needs 'state' and 'param_groups'")
    if not all("capturable" in g and "eps" not in g for g in groups):
        raise ValueError("this state_dict was not saved by the authors' SophiaG "
                         "(its param groups lack 'capturable' or already have 'eps')")
    out = copy.deepcopy(state_dict)
    for group in out["param_groups"]:
        group.pop("capturable")
        group.update(eps=1e-15, foreach=None, fused=None)
        group.setdefault("maximize", False)
    for state in out["state"].values():
        if "hessian" in state:
            state["hessian"] = state["hessian"] * bs
        step = state.get("step")
        if step is not None:
            state["step"] = torch.tensor(float(step.reshape(-1)[0]) if torch.is_tensor(step) else float(step),
                                         dtype=torch.float32)
    return out
