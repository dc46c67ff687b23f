"""Shared machinery of SophiaG and SophiaH: validation, state, dispatch, Hessian EMA, diagnostics."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sophia.optim import functional as F

_COUNTERS_KEY = "sophia_counters"
_CLASS_KEY = "sophia_optimizer"  # which Sophia saved a state dict: SophiaG and SophiaH refuse each other's
# The group settings only SophiaH has (update_period: its name for hessian_interval before SophiaG had one): a
# state dict saved without the class key is told apart by them.
_SOPHIAH_KEYS = ("update_period", "distribution")


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _global_scalar(t: Tensor) -> Tensor:
    """A reduction over a DTensor as a plain tensor (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _gather_to_cpu(scalars: list[Tensor]) -> Tensor:
    """Stack 0-d tensors and bring them to the host with one synchronisation."""
    device = scalars[0].device
    return torch.stack([t.to(device) for t in scalars]).cpu()


def _is_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:  # torch's optimizers' wording, which its generic optimizer tests match
            raise ValueError(f"Tensor {name} must be 1-element (a number or a one-element tensor), got shape "
                             f"{tuple(value.shape)}")
        return float(value.item())
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def validate_hyperparameters(group: Mapping[str, Any], owner: str) -> None:
    """Raise ValueError naming the first invalid hyperparameter of a group (or of the defaults).

    Looks only at the settings, never at ``params``: the constructor checks its defaults with it
    before it reads the parameters.
    """
    lr = _as_float("lr", group["lr"])
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{owner}: invalid lr {lr!r}: must be finite and >= 0")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{owner}: invalid betas {betas!r}: must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        b = _as_float(f"betas[{i}]", b)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{owner}: invalid betas[{i}] {b!r}: must be in [0, 1)")
    rho = _as_float("rho", group["rho"])
    if not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"{owner}: invalid rho {rho!r}: must be finite and >= 0")
    wd = _as_float("weight_decay", group["weight_decay"])
    if not (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"{owner}: invalid weight_decay {wd!r}: must be finite and >= 0")
    eps = _as_float("eps", group["eps"])
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{owner}: invalid eps {eps!r}: must be finite and > 0 "
                         "(it is the floor of the denominator max(rho * h, eps))")
    k = group["hessian_interval"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{owner}: invalid hessian_interval {k!r}: must be an int >= 1 (the steps between "
                         "Hessian refreshes)")
    for flag in ("maximize", "cuda_graph"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"{owner}: {flag} must be a bool, got {group[flag]!r}")
    if group["foreach"] is not None and not isinstance(group["foreach"], bool):
        raise ValueError(f"{owner}: foreach must be True, False or None, got {group['foreach']!r}")
    if group["fused"] is not None and not isinstance(group["fused"], bool) and group["fused"] != "triton":
        raise ValueError(f"{owner}: fused must be True, False, None or 'triton', got {group['fused']!r}")
    if group["foreach"] and group["fused"]:
        raise ValueError(f"{owner}: foreach=True and fused={group['fused']!r} are exclusive; choose one")
    if group["cuda_graph"] and group["fused"] == "triton":
        raise ValueError(f"{owner}: cuda_graph=True replays the compiled update; it excludes fused='triton'")
    if group["cuda_graph"] and group["foreach"]:
        raise ValueError(f"{owner}: cuda_graph=True replays the compiled update; it excludes foreach=True")


def validate_params(params: Sequence[Any], group: Mapping[str, Any], owner: str) -> None:
    """Raise naming the first parameter that this group's settings cannot optimize."""
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{owner}: params must be tensors, got {type(p).__name__}")
        if p.is_complex():
            raise ValueError(f"{owner} does not support complex parameters; optimize "
                             "torch.view_as_real(p) as a real parameter instead")
        if not p.is_floating_point():
            raise ValueError(f"{owner}: parameter of dtype {p.dtype} is not floating point")
        if group["cuda_graph"] and not p.is_cuda:
            raise ValueError(f"{owner}: cuda_graph=True needs CUDA parameters, but parameter {i} of its "
                             f"group is on {p.device}; move the model to the GPU first, or leave cuda_graph off")


def _group_tensors(params: Any) -> list[Any]:
    """The parameters of a group as torch's add_param_group will store them (names dropped)."""
    if isinstance(params, Tensor):
        return [params]
    return [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]


def _counter(counters: Mapping[str, Any], key: str, minimum: int = 0) -> int:
    value = counters.get(key, 0)
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not _is_number(value) or value < minimum or value != int(value):
        raise ValueError(f"the state dict's {_COUNTERS_KEY}[{key!r}] must be a count >= {minimum}, got {value!r}")
    return int(value)


# The settings every SophiaG/SophiaH param group has always saved; a group without them is not ours.
_REQUIRED_KEYS = ("lr", "betas", "rho", "weight_decay")


def _describe_foreign(groups: Sequence[Mapping[str, Any]], missing: Sequence[str]) -> str:
    keys = sorted({k for g in groups for k in g if k != "params"})
    guess = ""
    if {"amsgrad", "eps"} <= set(keys):
        guess = " (torch.optim.AdamW's)" if any(g.get("decoupled_weight_decay") for g in groups) \
            else " (torch.optim.Adam's or AdamW's)"
    elif {"momentum", "dampening", "nesterov"} <= set(keys):
        guess = " (torch.optim.SGD's)"
    return (f"this state dict is from another optimizer{guess}: its param groups lack "
            f"{', '.join(repr(k) for k in missing)} and have {', '.join(keys) or 'no settings'}")


class SophiaBase(Optimizer):
    """Common base of :class:`~sophia.SophiaG` and :class:`~sophia.SophiaH`; not used directly."""

    # "SophiaG" or "SophiaH", inherited by a user's subclass: the state dicts it can load
    _kind = "Sophia"
    # Kept by copies and pickles besides torch's defaults, state and param_groups (with their defaults for
    # objects pickled before they were kept).
    _PICKLED = {"_hessian_updates": 0, "_hessian_skipped": 0, "_warned_nonfinite": False, "_steps": 0,
                "_refreshed_at": -1}

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        # The settings first, before params is looked at (as torch's optimizers do).
        self._validate_hyperparameters(defaults)
        self._hessian_updates = 0
        self._hessian_skipped = 0
        self._warned_nonfinite = False
        self._steps = 0  # step() calls that updated some parameter: the refresh schedule's clock
        self._refreshed_at = -1  # the value of _steps at the last refresh folded in (-1: none yet)
        self._graphs: dict[int, F.GraphedUpdate] = {}
        self._warned_moves = False
        super().__init__(params, defaults)

    # -- validation: every mutating call checks everything before it changes anything ----------
    def _validate_hyperparameters(self, group: Mapping[str, Any]) -> None:
        validate_hyperparameters(group, type(self).__name__)

    def _validate_group(self, group: Mapping[str, Any]) -> None:
        self._validate_hyperparameters(group)
        validate_params(group["params"], group, type(self).__name__)

    # -- construction and persistence -----------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and "params" in param_group:
            params = param_group["params"]
            if not isinstance(params, (Tensor, set, list)):
                param_group["params"] = list(params)  # a generator can be read only once
            self._validate_group({**self.defaults, **param_group,
                                  "params": _group_tensors(param_group["params"])})
        super().add_param_group(param_group)  # its own checks also come before it appends

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({key: getattr(self, key) for key in self._PICKLED})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, default in self._PICKLED.items():
            self.__dict__.setdefault(key, default)
        self.__dict__.setdefault("_graphs", {})  # captured graphs belong to the original's tensors
        self.__dict__.setdefault("_warned_moves", False)
        for group in self.param_groups:
            for key, value in self._group_setdefaults().items():
                group.setdefault(key, value)
        for s in self.state.values():
            if "step" in s and not torch.is_tensor(s["step"]):
                s["step"] = torch.tensor(float(s["step"]), dtype=torch.float32)

    def _upgrade_group(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """A param group as saved by an older version, in today's keys (SophiaH renames update_period)."""
        return dict(group)

    def _group_setdefaults(self) -> dict[str, Any]:
        return {"eps": 1e-15, "maximize": False, "foreach": None, "fused": None, "cuda_graph": False,
                "hessian_interval": 10}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd[_COUNTERS_KEY] = {"hessian_updates": self._hessian_updates,
                             "hessian_skipped": self._hessian_skipped, "steps": self._steps,
                             "refreshed_at": self._refreshed_at}
        sd[_CLASS_KEY] = self._kind
        return sd

    def _check_same_kind(self, state_dict: Mapping[str, Any]) -> None:
        """Refuse the other Sophia's state dict: its settings (update_period, distribution) are not this
        optimizer's, and taking them over would leave stray keys or missing ones in its groups."""
        owner = type(self).__name__
        saved = state_dict.get(_CLASS_KEY)
        if saved is None:  # saved before the class was recorded: SophiaH's groups alone have its settings
            has_h = any(k in g for g in state_dict["param_groups"] for k in _SOPHIAH_KEYS)
            saved = "SophiaH" if has_h else "SophiaG"
        if not isinstance(saved, str):
            raise ValueError(f"the state dict's {_CLASS_KEY} must be a class name, got {saved!r}; nothing was changed")
        if saved != self._kind:
            raise ValueError(f"this state dict was saved by {saved}, and {owner} is a {self._kind}: the two keep "
                             f"different settings (SophiaH's probe distribution) and {owner} loads only "
                             f"{self._kind} state dicts; build a {saved} to load it. Nothing was changed")

    def _check_state_dict(self, state_dict: Any) -> tuple[int, int]:
        """Raise ValueError unless ``state_dict`` loads completely; returns its Hessian counters."""
        owner = type(self).__name__
        if (not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping)
                or not isinstance(state_dict.get("param_groups"), list)
                or not all(isinstance(g, Mapping) and "params" in g for g in state_dict["param_groups"])):
            raise ValueError(f"{owner}.load_state_dict: not an optimizer state dict (it needs 'state' and "
                             "'param_groups', each group with its 'params')")
        groups = state_dict["param_groups"]
        if any("capturable" in g and "eps" not in g for g in groups):
            raise ValueError(
                "this state_dict was saved by the authors' SophiaG (sophia.py / sophia-opt), whose "
                "hessian is not yet multiplied by the batch size bs it was given at step(bs=...); "
                "convert it first: opt.load_state_dict(sophia.convert_authors_state_dict(sd, bs=N))")
        missing = [k for k in _REQUIRED_KEYS if any(k not in g for g in groups)]
        if missing:
            raise ValueError(f"{_describe_foreign(groups, missing)}. {owner} loads only state dicts saved "
                             f"by {owner} (or the authors' SophiaG, after convert_authors_state_dict); "
                             "nothing was changed")
        self._check_same_kind(state_dict)
        groups = [self._upgrade_group(g) for g in groups]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups)} param groups, this {owner} has "
                             f"{len(self.param_groups)}; nothing was changed")
        id_map: dict[Any, Tensor] = {}
        for i, (saved, current) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(current["params"]):
                raise ValueError(f"param group {i} of the state dict has {len(saved['params'])} parameters, "
                                 f"this {owner}'s has {len(current['params'])}; nothing was changed")
            # the group as it will be after loading: saved settings, this optimizer's tensors
            self._validate_group({**self._group_setdefaults(), **saved, "params": current["params"]})
            id_map.update(zip(saved["params"], current["params"]))
        for key, state in state_dict["state"].items():
            p = id_map.get(key)
            if p is None:
                continue
            if not isinstance(state, Mapping):
                raise ValueError(f"the state of parameter {key!r} is not a dict; nothing was changed")
            for name in ("exp_avg", "hessian"):
                t = state.get(name)
                if t is None:
                    continue
                if not isinstance(t, Tensor) or t.shape != p.shape or t.is_complex():
                    what = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(
                        f"the state dict's {name} for parameter {key!r} has {what}, but that parameter has "
                        f"shape {tuple(p.shape)}: the state dict belongs to another model; nothing was changed")
            step = state.get("step")
            if step is not None:
                if isinstance(step, Tensor):
                    step = step.item() if step.numel() == 1 else None
                if isinstance(step, bool) or not _is_number(step) or not (math.isfinite(step) and step >= 0):
                    raise ValueError(f"the state dict's step for parameter {key!r} must be a count >= 0, got "
                                     f"{state['step']!r}; nothing was changed")
        counters = state_dict.get(_COUNTERS_KEY, {})
        if not isinstance(counters, Mapping):
            raise ValueError(f"the state dict's {_COUNTERS_KEY} must be a dict, got {counters!r}")
        updates, skipped = _counter(counters, "hessian_updates"), _counter(counters, "hessian_skipped")
        if "steps" in counters:
            steps = _counter(counters, "steps")
            refreshed_at = _counter({"refreshed_at": counters.get("refreshed_at", -1)}, "refreshed_at", minimum=-1)
        else:  # saved before the optimizer kept its own clock: the parameters' step counts, refreshes on schedule
            steps = max((int(s["step"].item() if isinstance(s.get("step"), Tensor) else s.get("step", 0))
                         for s in state_dict["state"].values() if isinstance(s, Mapping)), default=0)
            k = min(int(g.get("hessian_interval", g.get("update_period", 10))) for g in groups) if groups else 10
            refreshed_at = (steps // k) * k if steps >= k and updates >= steps // k else -1
        return updates, skipped, steps, refreshed_at

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this class; it is checked completely first, so a refused
        one (another optimizer's, another model's, invalid settings) leaves the optimizer as it was."""
        updates, skipped, steps, refreshed_at = self._check_state_dict(state_dict)
        state_dict = dict(state_dict)
        state_dict.pop(_COUNTERS_KEY, None)
        state_dict.pop(_CLASS_KEY, None)
        state_dict["param_groups"] = [self._upgrade_group(g) for g in state_dict["param_groups"]]
        self._graphs.clear()  # new state tensors: captured graphs would write to the old ones
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self._group_setdefaults().items():  # dicts saved before a setting existed
                group.setdefault(key, value)
        self._hessian_updates, self._hessian_skipped = updates, skipped
        self._steps, self._refreshed_at = steps, refreshed_at

    # -- state ----------------------------------------------------------------------------
    def _state_for(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif "hessian" not in state:
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _params_with_grad(self, group: dict[str, Any]) -> list[Tensor]:
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; "
                                   "use a dense embedding (sparse=False)")
            out.append(p)
        return out

    def _implementation(self, group: dict[str, Any], params: list[Tensor]) -> str:
        if group["cuda_graph"]:
            if not all(p.is_cuda for p in params):
                raise ValueError(f"{type(self).__name__}: cuda_graph=True needs CUDA parameters")
            return "cuda-graph"
        if group["fused"] == "triton":
            # Opt-in: one Triton launch for all CUDA tensors of the group (sophia.optim.triton_kernel); the
            # multi-tensor path takes what it does not. Inside torch.compile the multi-tensor path is traced instead
            # (the kernel's raw-pointer tables are opaque to the compiler).
            if torch.compiler.is_compiling():
                return "foreach"
            return "triton"
        if group["fused"]:
            return "compiled"
        if group["foreach"] is None:
            # The fastest path that needs no torch.compile: multi-tensor kernels on CUDA; on CPU the C++
            # kernel (one pass over all tensors; benchmarks/results/step-cpu-floor), unless fused=False or it
            # cannot be built, then the per-tensor loop (torch's CPU foreach ops are loops that allocate
            # more; measured 2.4x slower in benchmarks/results/step).
            # Inside torch.compile the loop is traced and fused by the compiler instead (the kernel is opaque to it).
            if all(p.is_cuda for p in params):
                return "foreach"
            if group["fused"] is None and not torch.compiler.is_compiling() and F.cpu_kernel_usable(params):
                return "cpu-kernel"
            return "for-loop"
        return "foreach" if group["foreach"] else "for-loop"

    # -- the update -----------------------------------------------------------------------
    def _check_groups(self) -> None:
        """Refuse settings edited in a group after construction (e.g. lr = "0.1", betas = (0.9,)) before a
        step or a refresh changes anything."""
        for group in self.param_groups:
            self._validate_hyperparameters(group)

    def _groups_with_grads(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """Each group with its parameters that have a gradient, after refusing an impossible setting in
        any group: the step changes nothing before every group is known to be steppable."""
        self._check_groups()
        work = [(group, self._params_with_grad(group)) for group in self.param_groups]
        for group, params in work:
            self._implementation(group, params)
        return work

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if not params:
            return
        implementation = self._implementation(group, params)  # may refuse: before any state changes
        states = [self._state_for(p) for p in params]
        torch._foreach_add_([s["step"] for s in states], 1.0)
        beta1, _ = group["betas"]
        tensors = (params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["hessian"] for s in states])
        settings = dict(lr=_as_float("lr", group["lr"]), beta1=beta1, rho=group["rho"],
                        weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
        if implementation == "cuda-graph":
            graphed = self._graphs.setdefault(id(group), F.GraphedUpdate())
            graphed(*tensors, **settings)
            if graphed.error is not None and not self._warned_moves:
                self._warned_moves = True
                warnings.warn(f"{type(self).__name__}(cuda_graph=True): capturing the update failed ({graphed.error}); "
                              "it runs without a graph", RuntimeWarning, stacklevel=3)
            if graphed.moves >= 3 and graphed.replays == 0 and not self._warned_moves:
                self._warned_moves = True
                warnings.warn(f"{type(self).__name__}(cuda_graph=True): the gradients move between steps, so "
                              "the update runs without its CUDA graph; keep them in place with "
                              "zero_grad(set_to_none=False)", RuntimeWarning, stacklevel=3)
            return
        F.sophia_update(*tensors, **settings, implementation=implementation)

    # -- the Hessian EMA ------------------------------------------------------------------
    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _resolve_estimates(self, estimates: Mapping | Sequence) -> dict[Tensor, Tensor]:
        params = self._all_params()
        if isinstance(estimates, Mapping):
            known = {id(p) for p in params}
            pairs = list(estimates.items())
            for p, _ in pairs:
                if id(p) not in known:
                    raise ValueError("estimates has a key that is not a parameter of this optimizer")
        else:
            estimates = list(estimates)
            if len(estimates) != len(params):
                raise ValueError(
                    f"estimates has {len(estimates)} entries but the optimizer has {len(params)} "
                    "parameters; give one per parameter in param_groups order (None to skip) or a "
                    "dict {param: estimate}")
            pairs = list(zip(params, estimates))
        out = {}
        for p, e in pairs:
            if e is None:
                continue
            if not isinstance(e, Tensor):
                raise ValueError(f"a Hessian estimate must be a tensor, got {type(e).__name__}")
            if e.shape != p.shape:
                raise ValueError(f"Hessian estimate of shape {tuple(e.shape)} for a parameter of "
                                 f"shape {tuple(p.shape)}")
            if e.is_sparse or e.is_complex():
                raise ValueError("a Hessian estimate must be a dense real tensor")
            out[p] = e.detach().to(dtype=p.dtype, device=p.device)
        return out

    def _note_skipped(self, n: int, what: str) -> None:
        self._hessian_skipped += n
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: skipped a non-finite Hessian estimate for {n} "
                f"parameter tensor(s) ({what}); their hessian EMA was left unchanged. Further skips "
                "are counted in diagnostics()['hessian_skipped'] without warning.",
                RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def _fold_estimates(self, estimates: dict[Tensor, Tensor]) -> None:
        if not estimates:
            return
        ps = list(estimates)
        # Checked per local shard under FSDP: a rank skips only its own non-finite shard.
        finite = _gather_to_cpu([torch.isfinite(_local(estimates[p])).all() for p in ps]).tolist()
        bad = finite.count(False)
        if bad:
            self._note_skipped(bad, "explicit estimate with inf or nan")
        for group in self.param_groups:
            _, beta2 = group["betas"]
            ids = {id(p) for p in group["params"]}
            sel = [p for p, ok in zip(ps, finite) if ok and id(p) in ids]
            if sel:
                F.hessian_ema([self._state_for(p)["hessian"] for p in sel],
                              [estimates[p] for p in sel], beta2)
        self._hessian_updates += 1
        self._refreshed_at = self._steps

    @torch.no_grad()
    def update_hessian(self, bs: int | None = None, *,
                       estimates: Mapping[Tensor, Tensor | None] | Sequence[Tensor | None] | None = None
                       ) -> None:
        """Fold a diagonal Hessian estimate into the running ``hessian`` EMA.

        Two forms (give exactly one):

        * ``update_hessian(bs=N)``: Gauss-Newton-Bartlett. ``p.grad`` must hold the gradient of
          the *mean* loss over ``N`` predictions whose labels were sampled from the model (see
          :mod:`sophia.hessian`); the estimate is ``N * p.grad**2``.
        * ``update_hessian(estimates=...)``: any per-parameter estimate of diag(H), either a dict
          ``{param: tensor}`` or a sequence with one entry per parameter in ``param_groups``
          order (``None`` skips a parameter). Used as given (no scaling).

        Either way ``hessian = beta2 * hessian + (1 - beta2) * estimate``. ``bs=N`` with no
        gradient on any parameter raises ``RuntimeError`` and counts nothing. A parameter whose
        estimate holds inf or nan is skipped (its EMA is unchanged), counted in
        ``diagnostics()['hessian_skipped']``, and a warning is issued the first time.
        """
        self._check_groups()
        if (bs is None) == (estimates is None):
            raise ValueError("update_hessian needs exactly one of bs (the number of predictions the "
                             "sampled-label loss averaged over) or estimates")
        if estimates is not None:
            self._fold_estimates(self._resolve_estimates(estimates))
            return
        if isinstance(bs, bool) or not _is_number(bs) or not bs > 0 or not math.isfinite(bs):
            raise ValueError(f"bs must be a positive number of predictions, got {bs!r}")
        params = [p for g in self.param_groups for p in self._params_with_grad(g)]
        if not params:
            # Folding nothing would still count a refresh: a caller who got here skipped the backward
            # of the sampled-label loss, or zeroed its gradients too early.
            raise RuntimeError(
                f"{type(self).__name__}.update_hessian(bs={bs!r}): no parameter has a gradient to estimate "
                "from; run the backward of the sampled-label loss first and call it before zero_grad() "
                "(sophia.hessian.gnb_refresh does the whole refresh). Nothing was changed.")
        # One reduction per tensor and one sync: is bs * max|g|**2 finite in the grad's dtype?
        # Under FSDP each rank checks its local shard.
        grads = [_local(p.grad.detach()) for p in params]
        amax = _gather_to_cpu([g.abs().amax().double() if g.numel() else
                               torch.zeros((), dtype=torch.float64, device=g.device) for g in grads])
        est_max = amax * amax * float(bs)
        limits = torch.tensor([torch.finfo(p.dtype).max for p in params], dtype=torch.float64)
        ok = (torch.isfinite(est_max) & (est_max <= limits)).tolist()
        bad = ok.count(False)
        if bad:
            self._note_skipped(bad, "gradient with inf or nan, or bs * grad**2 overflows")
        ok_ids = {id(p) for p, fine in zip(params, ok) if fine}
        for group in self.param_groups:
            _, beta2 = group["betas"]
            sel = [p for p in self._params_with_grad(group) if id(p) in ok_ids]
            if sel:
                F.hessian_ema_from_grads([self._state_for(p)["hessian"] for p in sel],
                                         [p.grad for p in sel], beta2, float(bs))
        self._hessian_updates += 1
        self._refreshed_at = self._steps

    # -- diagnostics ----------------------------------------------------------------------
    @torch.no_grad()
    def win_rate(self) -> float:
        """Fraction of coordinates that the clip leaves alone: |m| < max(rho * h, eps).

        Computed on request from the current ``exp_avg`` and ``hessian`` (right after ``step``
        these are the ones that step used). Under FSDP2 it is a collective: call it on every
        rank. The authors' tuning advice: choose rho so that this stays between 0.1 and 0.5.
        Returns nan before the first step.
        """
        count, total = 0, 0
        for group in self.param_groups:
            ms, hs = [], []
            for p in group["params"]:
                s = self.state.get(p)
                if s and "exp_avg" in s:
                    ms.append(s["exp_avg"])
                    hs.append(s["hessian"])
                    total += p.numel()
            if ms:
                count += int(_global_scalar(F.unclipped_count(ms, hs, group["rho"], group["eps"])).item())
        return count / total if total else float("nan")

    @torch.no_grad()
    def hessian_norm(self) -> float:
        """Euclidean norm of the running Hessian estimate over all parameters."""
        hs = [s["hessian"] for s in self.state.values() if "hessian" in s and s["hessian"].numel()]
        if not hs:
            return 0.0
        return float(torch.linalg.vector_norm(
            torch.stack([_global_scalar(torch.linalg.vector_norm(h.double())).cpu() for h in hs])))

    def hessian_due(self, steps_ahead: int = 0) -> bool:
        """Whether a Hessian refresh is due now, between the step just taken and the next: after steps k, 2k,
        ... (k = ``hessian_interval``; the authors' schedule), until one is folded in. A training loop asks
        this instead of keeping its own counter; the clock is saved in the state dict.

        ``steps_ahead=1`` asks whether one will be due after the next step, for a loop that keeps the
        batches of that step for the refresh."""
        n = self._steps + steps_ahead
        return (n > 0 and (steps_ahead > 0 or self._refreshed_at != n)
                and any(n % g["hessian_interval"] == 0 for g in self.param_groups))

    @property
    def steps(self) -> int:
        """The ``step()`` calls that updated some parameter so far (saved in the state dict): the clock of the
        refresh schedule."""
        return self._steps

    @property
    def hessian_updates(self) -> int:
        """Hessian refreshes folded in so far (saved in the state_dict)."""
        return self._hessian_updates

    @property
    def hessian_skipped(self) -> int:
        """Parameter tensors whose non-finite estimate was skipped so far."""
        return self._hessian_skipped

    def diagnostics(self) -> dict[str, float | int]:
        """Win rate, Hessian norm, and how many Hessian refreshes were folded in or skipped."""
        return {"win_rate": self.win_rate(), "hessian_norm": self.hessian_norm(),
                "hessian_updates": self._hessian_updates, "hessian_skipped": self._hessian_skipped}

