"""The optimizers the harness knows: one registry entry each, with what the harness must know about it.

The harness asks an optimizer's name once, for its :class:`OptimizerEntry`; everything else (which fast
path it has, whether and when its Hessian estimate is refreshed, whether FSDP2 or DDP can run it, what to
suggest when it diverges) is a capability read from the entry. A new optimizer is one entry.

Lion and AdaHessian come from ``pytorch-optimizer``; their behaviour is checked against independent
formulas in tests/lm/test_model_and_registry.py before results rely on them. Muon is torch's, on the GPT's
hidden matrices, with torch's AdamW on the rest (:mod:`sophia.lm.muon`).

>>> entry = optimizer_entry("sophiag")
>>> entry.refresh, entry.cuda_graph, entry.create_graph(step=0, interval=10)
('gnb', True, False)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from sophia.lm.muon import DEFAULT_MUON_LR, MuonAdamW, split_gpt_groups
from sophia.optim import SophiaG, SophiaH


@dataclass
class OptimizerSettings:
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    rho: float = 0.05          # Sophia only
    eps: float | None = None   # None: the optimizer's own default
    hessian_interval: int = 10  # Sophia-G refresh period k; Sophia-H / AdaHessian update_period
    muon_lr: float | None = None  # Muon only: the hidden matrices' lr (``lr`` is the AdamW part's); None: 0.02
    muon_ns_dtype: torch.dtype = torch.bfloat16  # Muon only: the Newton-Schulz iteration's dtype (torch's)


# (param_groups, settings, fast) -> the optimizer; ``fast``: its fused kernel / CUDA-graph step, when it has one
Builder = Callable[[list[dict], OptimizerSettings, bool], "torch.optim.Optimizer | MuonAdamW"]


@dataclass(frozen=True)
class OptimizerEntry:
    """What the harness knows about one optimizer.

    ``refresh``: how its diagonal Hessian estimate is refreshed by the harness: ``"gnb"`` (Sophia-G's
    Gauss-Newton-Bartlett estimate after the steps its own clock marks), ``"hutchinson"`` (Sophia-H's,
    handed over before its refresh steps) or ``"none"``. ``second_order_graph``: its ``step()`` differentiates
    the gradients itself, so the training backward keeps its graph on its Hessian steps (no compile, no DDP).
    ``fused`` / ``cuda_graph``: the fast step it has on CUDA for whole (unsharded) tensors. ``fsdp_refusal``:
    why FSDP2 cannot run it (None: it can). ``divergence_hint``: what to add to "a lower --lr" when it diverges.
    ``state_bytes``: its state's bytes per fp32 parameter (exp_avg + hessian, moment buffers, ...).
    """

    name: str
    build: Builder
    refresh: Literal["none", "gnb", "hutchinson"] = "none"
    second_order_graph: bool = False
    fused: bool = False
    cuda_graph: bool = False
    fsdp_refusal: str | None = None
    divergence_hint: str = ""
    state_bytes: int = 8  # optimizer state per (fp32) parameter, for the memory estimate

    @property
    def estimates_curvature(self) -> bool:
        """Whether it computes a Hessian estimate at all (extra passes, its first refresh compiles a graph)."""
        return self.refresh != "none" or self.second_order_graph

    @property
    def has_fast_step(self) -> bool:
        return self.fused or self.cuda_graph

    def create_graph(self, step: int, interval: int) -> bool:
        """Whether training step ``step`` (0-based) must call backward(create_graph=True).

        pytorch-optimizer's AdaHessian refreshes when its own step count minus one is a multiple of the
        period, i.e. on 0-based steps 0, k, 2k, ..."""
        return self.second_order_graph and step % interval == 0


def _betas(s: OptimizerSettings) -> tuple[float, float]:
    return (s.beta1, s.beta2)


def _eps(s: OptimizerSettings) -> dict[str, float]:
    return {} if s.eps is None else {"eps": s.eps}


def _adamw(groups: list[dict], s: OptimizerSettings, fast: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=s.lr, betas=_betas(s), weight_decay=s.weight_decay,
                             **({"fused": True} if fast else {}), **_eps(s))


def _sophiag(groups: list[dict], s: OptimizerSettings, fast: bool) -> torch.optim.Optimizer:
    return SophiaG(groups, lr=s.lr, betas=_betas(s), rho=s.rho, weight_decay=s.weight_decay,
                   hessian_interval=s.hessian_interval, **({"cuda_graph": True} if fast else {}), **_eps(s))


def _sophiah(groups: list[dict], s: OptimizerSettings, fast: bool) -> torch.optim.Optimizer:
    return SophiaH(groups, lr=s.lr, betas=_betas(s), rho=s.rho, weight_decay=s.weight_decay,
                   hessian_interval=s.hessian_interval, **_eps(s))


def _lion(groups: list[dict], s: OptimizerSettings, fast: bool) -> torch.optim.Optimizer:
    from pytorch_optimizer import Lion

    return Lion(groups, lr=s.lr, betas=_betas(s), weight_decay=s.weight_decay)


def _adahessian(groups: list[dict], s: OptimizerSettings, fast: bool) -> torch.optim.Optimizer:
    from pytorch_optimizer import AdaHessian

    return AdaHessian(groups, lr=s.lr, betas=_betas(s), weight_decay=s.weight_decay,
                      update_period=s.hessian_interval, hessian_distribution="rademacher", **_eps(s))


def _sgd(groups: list[dict], s: OptimizerSettings, fast: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.beta1, weight_decay=s.weight_decay)


def _muon(groups: list[dict], s: OptimizerSettings, fast: bool) -> MuonAdamW:
    muon_groups, adamw_groups = split_gpt_groups(groups)
    muon_lr = DEFAULT_MUON_LR if s.muon_lr is None else s.muon_lr
    return MuonAdamW(muon_groups, adamw_groups, lr=s.lr, muon_lr=muon_lr, weight_decay=s.weight_decay,
                     betas=_betas(s), ns_dtype=s.muon_ns_dtype, **_eps(s), **({"fused": True} if fast else {}))


_RHO_HINT = " or a larger --rho"
REGISTRY: dict[str, OptimizerEntry] = {e.name: e for e in (
    OptimizerEntry("adamw", _adamw, fused=True),
    OptimizerEntry("sophiag", _sophiag, refresh="gnb", cuda_graph=True, divergence_hint=_RHO_HINT),
    OptimizerEntry("sophiah", _sophiah, refresh="hutchinson", divergence_hint=_RHO_HINT),
    OptimizerEntry("lion", _lion, state_bytes=4),
    OptimizerEntry("adahessian", _adahessian, second_order_graph=True,
                   fsdp_refusal="needs backward(create_graph=True) through the sharded weights, which FSDP2 does "
                                "not support"),
    OptimizerEntry("sgd", _sgd, state_bytes=4),
    OptimizerEntry("muon", _muon, fused=True,
                   fsdp_refusal="orthogonalises whole matrices, which FSDP2 shards"),
)}
OPTIMIZERS = tuple(REGISTRY)
# Optimizers whose training backward must keep its graph on Hessian steps (they differentiate p.grad
# inside step()). Sophia-H does not: the harness hands it a Hutchinson estimate computed separately.
NEEDS_CREATE_GRAPH = tuple(name for name, e in REGISTRY.items() if e.second_order_graph)


def optimizer_entry(name: str) -> OptimizerEntry:
    """The registry entry of ``name``, or ValueError naming the choices."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None


def build_optimizer(name: str, param_groups: list[dict], s: OptimizerSettings, *, fused: bool = False,
                    cuda_graph: bool = False) -> torch.optim.Optimizer | MuonAdamW:
    """``param_groups`` carry their own weight_decay (0 for vectors); other settings from ``s``.

    ``fused``: torch's fused AdamW kernel (CUDA); ``cuda_graph``: SophiaG's step replayed from a CUDA graph;
    each is ignored by an optimizer without it. ``muon`` needs the groups of
    :meth:`sophia.lm.model.GPT.param_groups` (it splits off the hidden matrices)."""
    entry = optimizer_entry(name)
    return entry.build(param_groups, s, (fused and entry.fused) or (cuda_graph and entry.cuda_graph))


def needs_create_graph(name: str, step: int, interval: int) -> bool:
    """Whether training step ``step`` (0-based) of optimizer ``name`` must call backward(create_graph=True)."""
    return optimizer_entry(name).create_graph(step, interval)


__all__ = ["NEEDS_CREATE_GRAPH", "OPTIMIZERS", "REGISTRY", "OptimizerEntry", "OptimizerSettings", "build_optimizer",
           "needs_create_graph", "optimizer_entry"]
