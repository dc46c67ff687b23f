"""The Hessian refresh, once, for every training loop that drives Sophia.

A refresh is Sophia's contract with a loop: which labels it samples, how ``N`` is counted over
micro-batches and ranks, how the sampled-label gradients are combined across ranks and clipped,
and that the training gradients pending in ``.grad`` survive it. ``sophia train``,
``SophiaTrainer``, ``SophiaCallback`` and :func:`sophia.hessian.gnb_refresh` all call this module;
what differs between them is supplied by the caller:

* how each micro-batch's sampled loss is produced (a callable returning a
  :class:`~sophia.hessian.SampledLoss`: eagerly, or with the labels drawn inside a compiled
  forward), with labels from :func:`label_generator` of (seed, step, rank, micro-batch);
* how gradients meet across ranks, as a :class:`Reduction`: none (one process),
  :class:`WrapperAverage` (the DDP/FSDP wrapper averages them in the last micro-batch's backward)
  or :class:`AllReduceSum` (an explicit all-reduce, where the wrapper cannot be used).

The arithmetic is the same for all: each micro-batch's backward is of ``loss * n`` (the sum over
its predictions); the reduction makes ``.grad`` the sum over ranks (the wrapper's average times the
world size, exact for a power-of-two world); the refresh divides by the global ``N``, clips, and
folds ``update_hessian(bs=N)``. So the same micro-batches, seed and step give bitwise the same
Hessian EMA whichever loop ran them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import Tensor

from sophia.hessian.gnb import SampledLoss, categorical_sampled_loss

__all__ = [
    "AllReduceSum",
    "HutchinsonAverage",
    "Reduction",
    "WrapperAverage",
    "distributed_world",
    "gnb_refresh_micro_batches",
    "label_generator",
    "prediction_mask",
    "sampled_categorical",
]

# Gradients are summed over ranks in flat buckets of at most this many elements.
_BUCKET_NUMEL = 1 << 24


def distributed_world() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def label_generator(device: torch.device | str, seed: int, step: int, rank: int, micro: int = 0) -> torch.Generator:
    """The generator of the labels (or probes) drawn for micro-batch ``micro`` of the refresh at optimizer
    step ``step`` on ``rank``.

    Seeded from (seed, step, rank, micro) alone, every refresh is reproducible without saved generator
    state: a resumed run samples what the uninterrupted one sampled. Ranks and micro-batches draw
    independently (shared draws would bias ``N * g**2``)."""
    mixed = (int(seed) * 1_000_003 + int(step) * 7_919 + int(rank) * 104_729 + int(micro) * 15_485_863) % (2**63 - 1)
    gen = torch.Generator(device=device)
    gen.manual_seed(mixed)
    return gen


def prediction_mask(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """The positions that are predictions: labels other than ``ignore_index`` (count them with ``.sum()``)."""
    return labels != ignore_index


def sampled_categorical(logits: Tensor, labels: Tensor | None, *, ignore_index: int = -100,
                        generator: torch.Generator | None = None) -> SampledLoss:
    """Cross-entropy against labels sampled from ``logits`` at the positions the training loss counts.

    ``labels`` (shaped like ``logits[..., 0]``, already shifted as the loss shifts them) only marks which
    predictions count: those equal to ``ignore_index`` are left out of the sampling and of N.
    ``labels=None`` counts them all. A micro-batch with nothing to predict gives ``n == 0`` and a zero loss.
    """
    if labels is None:
        return categorical_sampled_loss(logits, generator=generator)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits of shape "
                         f"{tuple(logits.shape)} (expected labels shaped like logits[..., 0])")
    mask = prediction_mask(labels, ignore_index)
    if not bool(mask.any()):
        return SampledLoss(logits.sum() * 0.0, 0)
    return categorical_sampled_loss(logits, mask=mask, generator=generator)


# -- how the sampled gradients meet across ranks ----------------------------------------------------------
class Reduction:
    """One process: nothing to combine. Subclasses combine ranks; after :meth:`to_sum` every ``.grad``
    holds the sum over ranks of the ranks' ``sum over predictions`` gradients."""

    world_size = 1

    def backward_context(self, last: bool) -> AbstractContextManager:
        """Around each micro-batch's forward and backward (``last``: the refresh's last micro-batch)."""
        return nullcontext()

    def to_sum(self, grads: list[Tensor]) -> None:
        """Make ``grads`` the sums over ranks, in place."""

    def total(self, n_local: int, device: torch.device) -> int:
        """N over ranks."""
        return n_local


class _Distributed(Reduction):
    def __init__(self) -> None:
        self.world_size = dist.get_world_size() if distributed_world() else 1

    def total(self, n_local: int, device: torch.device) -> int:
        if self.world_size == 1:
            return n_local
        if dist.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        count = torch.tensor([float(n_local)], dtype=torch.float64, device=device)
        dist.all_reduce(count)
        return int(count.item())


class WrapperAverage(_Distributed):
    """The DDP or FSDP wrapper reduces: the sampled forward runs through the wrapped model, and the wrapper
    averages the gradients over ranks in the last micro-batch's backward. ``sync(last)`` is the wrapper's
    own switch (``model.no_sync()`` for DDP, ``set_requires_gradient_sync`` for FSDP2); ``None`` when
    every refresh is one micro-batch. The average times the world size is the sum (exact for 1, 2, 4, ...
    ranks)."""

    def __init__(self, sync: Callable[[bool], AbstractContextManager] | None = None) -> None:
        super().__init__()
        self.sync = sync

    def backward_context(self, last: bool) -> AbstractContextManager:
        return self.sync(last) if self.sync is not None else nullcontext()

    def to_sum(self, grads: list[Tensor]) -> None:
        if self.world_size > 1:
            for g in grads:  # one by one: FSDP's gradients are DTensors
                g.mul_(float(self.world_size))


class AllReduceSum(_Distributed):
    """The parameters' own forward (no wrapper, as in Lightning's refresh of the LightningModule): the
    gradients are summed over ranks here, in a few flat buckets per (device, dtype)."""

    def to_sum(self, grads: list[Tensor]) -> None:
        if self.world_size > 1:
            _all_reduce_sum_(grads)


def _all_reduce_sum_(tensors: list[Tensor]) -> None:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for ts in groups.values():
        start = 0
        while start < len(ts):
            end, size = start, 0
            while end < len(ts) and (end == start or size + ts[end].numel() <= _BUCKET_NUMEL):
                size += ts[end].numel()
                end += 1
            bucket = ts[start:end]
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            start = end


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@contextmanager
def stashed_grads(params: Sequence[Tensor]) -> Iterator[None]:
    """Take the gradients out of ``params`` for the duration, and put the same tensors back."""
    stashed = [p.grad for p in params]
    stashed_ptrs = {_local(g).data_ptr() for g in stashed if g is not None and g.numel()}
    for p in params:
        p.grad = None
    try:
        yield
        if any(p.grad is not None and p.grad.numel() and _local(p.grad).data_ptr() in stashed_ptrs for p in params):
            raise RuntimeError(
                "the sampled-label backward wrote into the memory of the pending training gradients (DDP with "
                "gradient_as_bucket_view=True?); refresh after optimizer.step() and zero_grad(), when no "
                "training gradients are pending")
    finally:
        for p, g in zip(params, stashed):
            p.grad = g


def _check_max_grad_norm(max_grad_norm: float | None) -> None:
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                      or not (math.isfinite(max_grad_norm) and max_grad_norm > 0)):
        raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {max_grad_norm!r}")


def gnb_refresh_micro_batches(optimizer: torch.optim.Optimizer, sampled_losses: Sequence[Callable[[], SampledLoss]],
                              *, reduction: Reduction | None = None, max_grad_norm: float | None = None) -> int:
    """One Gauss-Newton-Bartlett refresh over the micro-batches of a step; returns the global N.

    Each callable runs one micro-batch's forward and returns its mean sampled-label loss and its number of
    predictions. The gradient folded in is that of the mean over all N predictions of all micro-batches
    and ranks, clipped at ``max_grad_norm``; then ``optimizer.update_hessian(bs=N)``. A parameter the
    output does not reach gets a zero estimate (its Gauss-Newton diagonal is exactly 0). The training
    gradients in ``.grad`` when it starts are the same tensors, unchanged, when it ends. ``reduction``:
    see the module docstring (default: one process).
    """
    _check_max_grad_norm(max_grad_norm)
    reduction = reduction or Reduction()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if not params:
        raise ValueError("the optimizer has no parameter that requires a gradient")
    with stashed_grads(params):
        n_local = 0
        for i, fn in enumerate(sampled_losses):
            with reduction.backward_context(i == len(sampled_losses) - 1), torch.enable_grad():
                sampled = fn()
                if not isinstance(sampled, SampledLoss):
                    raise TypeError("a sampled-label loss must be a sophia.hessian.SampledLoss (loss, n)")
                # loss * n: the sum over this micro-batch's predictions (n = 0 still joins the wrapper's reduction)
                (sampled.loss * sampled.n).backward()
            n_local += int(sampled.n)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        reduction.to_sum(grads)
        n = reduction.total(n_local, params[0].device)
        if n == 0:
            warnings.warn("Sophia: the Hessian refresh found no predictions to sample (every label is the ignore "
                          "index); the Hessian estimate was left unchanged", RuntimeWarning, stacklevel=2)
            return 0
        for g in grads:
            g.div_(float(n))
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.update_hessian(bs=n)
    return n


class HutchinsonAverage:
    """Hutchinson estimates of a step's micro-batches, averaged with their prediction counts as weights, over
    ranks too (each rank's estimates are plain tensors: an explicit all-reduce)."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.sums: list[Tensor] | None = None
        self.weight = 0.0

    def add(self, estimates: Sequence[Tensor], n: float) -> None:
        """One micro-batch's estimate, whose loss averaged ``n`` predictions."""
        if n == 0:
            return
        if self.sums is None:
            self.sums = [e.mul(n) for e in estimates]
        else:
            torch._foreach_add_(self.sums, list(estimates), alpha=n)
        self.weight += n

    def result(self, reduction: Reduction | None = None) -> list[Tensor] | None:
        """The weighted mean over micro-batches and ranks (a collective under a distributed reduction: every
        rank calls it, one that predicted nothing too); None when nothing was predicted anywhere."""
        reduction = reduction or Reduction()
        sums = self.sums if self.sums is not None else [torch.zeros_like(p) for p in self.params]
        weight = float(self.weight)
        if reduction.world_size > 1:
            _all_reduce_sum_(sums)
            weight = float(reduction.total(int(round(weight)), self.params[0].device))
        if weight == 0:
            return None
        torch._foreach_div_(sums, weight)
        return sums
