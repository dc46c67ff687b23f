"""Muon on the GPT's hidden matrices, AdamW on the rest, as one optimizer for the training loop.

Muon (``torch.optim.Muon``) orthogonalises each matrix's momentum with a Newton-Schulz
iteration; it is meant for the 2-D weights of hidden layers only. Embeddings (the token
embedding, tied to the output head, and the position embedding), LayerNorm parameters, biases
and QK-norm gains go to ``torch.optim.AdamW``. :class:`MuonAdamW` holds the two and shows the
loop one object: one ``step``, one ``zero_grad``, one ``state_dict`` in torch's own layout
(``state`` and ``param_groups``, the Muon groups first, parameters numbered across both), so a
checkpoint resumes bitwise.

Learning rates: the Muon groups carry ``lr_scale = muon_lr / lr``; the training loop sets every
group's lr to the schedule's value times its ``lr_scale`` (1 where absent), so ``--lr`` is the
AdamW part's lr and the Muon lr follows the same warm-up and cosine at a fixed multiple.
The scale is saved with the optimizer's state, so ``--resume`` with a new ``--lr`` moves the Muon
lr by the same factor (``--muon-lr`` itself cannot change on resume). torch's Muon then scales a
matrix's step by ``sqrt(max(1, rows / cols))`` (its default ``adjust_lr_fn``, Keller Jordan's) and
decays weights by ``lr * weight_decay`` per step.

The Newton-Schulz dtype: torch runs the iteration in bfloat16. :class:`Muon` is torch's Muon with
that dtype a choice (``ns_dtype``, default bfloat16: its steps then equal torch's bitwise, tested), for
CPUs without bfloat16 matrix instructions. On the development machine (AVX-512 BF16) bfloat16 is the
faster: a whole Muon + AdamW step took 22 ms in bfloat16 against 31 ms in float32 on ``tiny`` (118 against
216 ms on ``small``, under load), one thread, side by side (benchmarks/muon_ns_speed.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

MUON_MOMENTUM = 0.95  # torch's and Keller Jordan's default (Nesterov)
DEFAULT_MUON_LR = 0.02
MUON_NS_DTYPES = ("bfloat16", "float32")  # the Newton-Schulz dtypes the harness offers (torch's first)


def newton_schulz(update: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                   dtype: torch.dtype) -> Tensor:
    """The quintic Newton-Schulz orthogonalisation of torch's Muon (the same operations in the same order),
    in ``dtype``, on a copy of ``update`` (a 2-D matrix)."""
    a, b, c = coefficients
    x = update.to(dtype, copy=True)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, rule: str | None, shape: torch.Size) -> float:
    """torch's Muon lr rules: "original" (default) sqrt(max(1, rows / cols)), "match_rms_adamw" 0.2 sqrt(max)."""
    rows, cols = shape[:2]
    if rule is None or rule == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if rule == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with its Newton-Schulz iteration in ``ns_dtype`` (torch's: bfloat16).

    The same hyperparameters, parameter groups and state (``momentum_buffer``) as torch's, so a state
    dict moves between the two; only the iteration's dtype differs, and with ``ns_dtype=torch.bfloat16``
    the steps equal torch's bitwise.
    """

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> None:
        if ns_dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            raise ValueError(f"ns_dtype must be a floating dtype, got {ns_dtype!r}")
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay, momentum = float(group["lr"]), group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p) or p.grad.is_sparse:
                    raise RuntimeError("Muon supports neither complex parameters nor sparse gradients")
                grad = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                p.mul_(1 - lr * decay)
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has native bfloat16 matrix instructions (x86 ``avx512_bf16`` or ``amx_bf16``, Arm
    ``bf16``), read from ``cpuinfo``; None where that cannot be told (no such file, no flags line). Without
    them torch computes bfloat16 matmuls slowly: Muon's bfloat16 Newton-Schulz iteration took 20-25x
    float32's time per step on an AVX2-only CPU (``benchmarks/results/muon-ns-speed/``)."""
    try:
        with open(cpuinfo) as f:
            lines = [ln for ln in f if ln.lower().startswith(("flags", "features"))]
    except OSError:
        return None
    if not lines:
        return None
    flags = set(lines[0].split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def split_gpt_groups(param_groups: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the Muon groups, the AdamW groups) of :meth:`sophia.lm.model.GPT.param_groups`' output.

    GPT registers the token and position embeddings before its blocks, so the matrix group lists
    ``wte`` (also the tied ``lm_head``), ``wpe``, then four matrices per block: attention qkv (3d x d)
    and proj (d x d), MLP fc (4d x d) and fc2 (d x 4d). The shapes are checked, so another layout
    is refused instead of being split wrongly. Both parts keep the matrix group's weight decay.
    """
    matrices = [g for g in param_groups if any(p.dim() >= 2 for p in g["params"])]
    if len(matrices) != 1 or any(p.dim() != 2 for p in matrices[0]["params"]):
        raise ValueError("muon expects the parameter groups of GPT.param_groups: one group of matrices "
                         "(embeddings first) and one of vectors")
    group = matrices[0]
    params = list(group["params"])
    embeddings, hidden = params[:2], params[2:]
    d = embeddings[0].shape[1] if embeddings else 0
    expected = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * (len(hidden) // 4)
    if len(embeddings) != 2 or [tuple(p.shape) for p in hidden] != expected or len(hidden) % 4:
        raise ValueError("muon expects GPT.param_groups' matrices in GPT's order: wte, wpe, then qkv, proj, "
                         f"fc, fc2 per block; got shapes {[tuple(p.shape) for p in params]}")
    adamw_groups = [{**group, "params": embeddings}] + [g for g in param_groups if g is not group]
    return [{**group, "params": hidden}], adamw_groups


class MuonAdamW:
    """:class:`Muon` on ``muon_groups`` (2-D parameters only) and ``torch.optim.AdamW`` on
    ``adamw_groups``, stepped together; ``weight_decay`` is the default for groups without their own.
    ``ns_dtype`` is the Newton-Schulz iteration's dtype (torch's bfloat16 by default).

    ``param_groups`` is the Muon groups then the AdamW groups (the inner optimizers' own dicts, so
    setting a group's ``lr`` reaches them); ``state`` maps every parameter to its state.

    >>> w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.zeros(4))
    >>> opt = MuonAdamW([{"params": [w]}], [{"params": [b]}], lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    >>> [g["lr"] for g in opt.param_groups], opt.param_groups[0]["lr_scale"]
    ([0.02, 0.001], 20.0)
    >>> (w.sum() + b.sum()).backward(); opt.step(); opt.zero_grad()
    >>> sorted(len(s) for s in opt.state.values())  # Muon: momentum; AdamW: step, exp_avg, exp_avg_sq
    [1, 3]
    """

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], *, lr: float, muon_lr: float,
                 weight_decay: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 momentum: float = MUON_MOMENTUM, fused: bool | None = None,
                 ns_dtype: torch.dtype = torch.bfloat16) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not muon_lr > 0:
            raise ValueError(f"muon_lr must be > 0, got {muon_lr}")
        self.muon = Muon([{**g, "lr_scale": muon_lr / lr} for g in muon_groups], lr=muon_lr,
                         weight_decay=weight_decay, momentum=momentum, nesterov=True, ns_dtype=ns_dtype)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       fused=fused)
        self.param_groups: list[dict[str, Any]] = self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict[Tensor, dict[str, Any]]:
        """Every parameter's state (a merged view: read it, do not assign through it)."""
        return {**self.muon.state, **self.adamw.state}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def _n_muon_params(self) -> int:
        return sum(len(g["params"]) for g in self.muon.param_groups)

    def state_dict(self) -> dict[str, Any]:
        """torch's layout for all groups at once: AdamW's parameter indices follow Muon's."""
        m, a = self.muon.state_dict(), self.adamw.state_dict()
        k = self._n_muon_params()
        return {"state": {**m["state"], **{i + k: s for i, s in a["state"].items()}},
                "param_groups": m["param_groups"]
                + [{**g, "params": [i + k for i in g["params"]]} for g in a["param_groups"]]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        n_muon = len(self.muon.param_groups)
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups)} parameter groups; this Muon + AdamW has "
                             f"{len(self.param_groups)}")
        k = self._n_muon_params()
        state = state_dict["state"]
        self.muon.load_state_dict({"state": {i: s for i, s in state.items() if int(i) < k},
                                   "param_groups": groups[:n_muon]})
        self.adamw.load_state_dict({"state": {int(i) - k: s for i, s in state.items() if int(i) >= k},
                                    "param_groups": [{**g, "params": [i - k for i in g["params"]]}
                                                     for g in groups[n_muon:]]})
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    def __repr__(self) -> str:
        return f"MuonAdamW(\n{self.muon!r},\n{self.adamw!r})"
