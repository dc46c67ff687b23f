"""The optimizers the harness knows, built the same way for every one.

Lion and AdaHessian come from ``pytorch-optimizer``; their behaviour is checked against
independent formulas in tests/lm/test_optimizers.py before results rely on them. Muon is
torch's, on the GPT's hidden matrices, with torch's AdamW on the rest (:mod:`sophia.lm.muon`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sophia.lm.muon import DEFAULT_MUON_LR, MuonAdamW, split_gpt_groups
from sophia.optim import SophiaG, SophiaH

OPTIMIZERS = ("adamw", "sophiag", "sophiah", "lion", "adahessian", "sgd", "muon")
# Optimizers whose training backward must keep its graph on Hessian steps (they differentiate p.grad
# inside step()). Sophia-H does not: the harness hands it a Hutchinson estimate computed separately.
NEEDS_CREATE_GRAPH = ("adahessian",)


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


def build_optimizer(name: str, param_groups: list[dict], s: OptimizerSettings, *, fused: bool = False,
                    cuda_graph: bool = False) -> torch.optim.Optimizer | MuonAdamW:
    """``param_groups`` carry their own weight_decay (0 for vectors); other settings from ``s``.

    ``fused``: torch's fused AdamW kernel (CUDA); ``cuda_graph``: SophiaG's step replayed from a CUDA graph.
    ``muon`` needs the groups of :meth:`sophia.lm.model.GPT.param_groups` (it splits off the hidden matrices)."""
    betas = (s.beta1, s.beta2)
    eps = {} if s.eps is None else {"eps": s.eps}
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=s.lr, betas=betas, weight_decay=s.weight_decay,
                                 **({"fused": True} if fused else {}), **eps)
    if name == "sophiag":
        return SophiaG(param_groups, lr=s.lr, betas=betas, rho=s.rho, weight_decay=s.weight_decay,
                       hessian_interval=s.hessian_interval, **({"cuda_graph": True} if cuda_graph else {}), **eps)
    if name == "sophiah":
        return SophiaH(param_groups, lr=s.lr, betas=betas, rho=s.rho, weight_decay=s.weight_decay,
                       hessian_interval=s.hessian_interval, **eps)
    if name == "lion":
        from pytorch_optimizer import Lion

        return Lion(param_groups, lr=s.lr, betas=betas, weight_decay=s.weight_decay)
    if name == "adahessian":
        from pytorch_optimizer import AdaHessian

        return AdaHessian(param_groups, lr=s.lr, betas=betas, weight_decay=s.weight_decay,
                          update_period=s.hessian_interval, hessian_distribution="rademacher", **eps)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=s.lr, momentum=s.beta1, weight_decay=s.weight_decay)
    if name == "muon":
        muon_groups, adamw_groups = split_gpt_groups(param_groups)
        muon_lr = DEFAULT_MUON_LR if s.muon_lr is None else s.muon_lr
        return MuonAdamW(muon_groups, adamw_groups, lr=s.lr, muon_lr=muon_lr,
                         weight_decay=s.weight_decay, betas=betas, ns_dtype=s.muon_ns_dtype, **eps,
                         **({"fused": True} if fused else {}))
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def needs_create_graph(name: str, step: int, interval: int) -> bool:
    """Whether training step ``step`` (0-based) must call backward(create_graph=True).

    pytorch-optimizer's AdaHessian refreshes when its own step count minus one is a multiple of
    the period, i.e. on 0-based steps 0, k, 2k, ...
    """
    return name in NEEDS_CREATE_GRAPH and step % interval == 0
