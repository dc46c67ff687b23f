"""The Gauss-Newton-Bartlett refresh over several micro-batches, shared by the integrations.

A training loop with gradient accumulation averages its loss over all predictions of all
micro-batches of an optimizer step (and over ranks under DDP). The refresh here does the same
for the sampled-label loss: each micro-batch's backward is weighted by its number of
predictions, the gradients and the counts are summed over ranks, and the estimate is folded in
with ``update_hessian(bs=N)`` where N counts every prediction of the global batch. The
training gradients present in ``.grad`` when it starts are put back when it ends.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from sophia.hessian import SampledLoss, categorical_sampled_loss
from sophia.optim.base import SophiaBase

# Gradients are summed over ranks in flat buckets of at most this many elements.
_BUCKET_NUMEL = 1 << 24


def distributed_world() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def refresh_generator(device: torch.device, seed: int, step: int, rank: int, micro: int = 0) -> torch.Generator:
    """A generator for the labels (or probes) drawn at optimizer step ``step`` on ``rank``.

    Seeding from (seed, step, rank) makes every refresh reproducible without saving generator
    state: a run resumed from a checkpoint samples the labels the uninterrupted run sampled,
    whatever the training loop did with the global RNG in between.
    """
    mixed = (seed * 1_000_003 + step * 7_919 + rank * 104_729 + micro * 15_485_863) % (2**63 - 1)
    gen = torch.Generator(device=device)
    gen.manual_seed(mixed)
    return gen


def sampled_categorical(logits: Tensor, labels: Tensor | None, *, ignore_index: int = -100,
                        generator: torch.Generator | None = None) -> SampledLoss:
    """Cross-entropy against labels sampled from ``logits`` at the positions the training loss counts.

    ``labels`` (shaped like ``logits[..., 0]``) only marks which predictions count: those equal
    to ``ignore_index`` are left out of the sampling and of N. ``labels=None`` counts them all.
    A micro-batch with nothing to predict gives ``n == 0`` and a zero loss.
    """
    if labels is None:
        return categorical_sampled_loss(logits, generator=generator)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits of shape "
                         f"{tuple(logits.shape)} (expected labels shaped like logits[..., 0])")
    mask = labels != ignore_index
    if not bool(mask.any()):
        return SampledLoss(logits.sum() * 0.0, 0)
    return categorical_sampled_loss(logits, mask=mask, generator=generator)


@contextmanager
def stashed_grads(params: Sequence[Tensor]) -> Iterator[None]:
    """Take the gradients out of ``params`` for the duration, and put the same tensors back."""
    stashed = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, stashed):
            p.grad = g


def _all_reduce_sum_(tensors: list[Tensor]) -> None:
    """Sum ``tensors`` over ranks in place, a few flat buckets per (device, dtype)."""
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


def gnb_refresh_micro_batches(optimizer: SophiaBase, sampled_losses: Sequence[Callable[[], SampledLoss]], *,
                              max_grad_norm: float | None = None, distributed: bool | None = None) -> int:
    """One Gauss-Newton-Bartlett refresh over several micro-batches; returns the global N.

    Each callable runs one micro-batch's forward and returns its mean sampled-label loss and
    count. The gradient folded in is that of the mean over all N predictions (of all ranks when
    ``distributed``): the parameters' own forward, no DDP wrapper, with the gradients summed over
    ranks here. ``max_grad_norm`` clips that gradient before ``update_hessian(bs=N)``. Pending
    training gradients are left as they were.
    """
    if distributed is None:
        distributed = distributed_world()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    with stashed_grads(params):
        n_local = 0
        for fn in sampled_losses:
            with torch.enable_grad():
                sampled = fn()
                if not isinstance(sampled, SampledLoss):
                    raise TypeError("a sampled-label loss must be a sophia.SampledLoss (loss, n)")
                if sampled.n:
                    # loss * n: the sum over this micro-batch's predictions; divided by N below
                    (sampled.loss * sampled.n).backward()
            n_local += int(sampled.n)
        for p in params:
            if p.grad is None:  # unreached by the output: its Gauss-Newton diagonal is exactly 0
                p.grad = torch.zeros_like(p)
        n = n_local
        if distributed:
            count = torch.tensor([float(n_local)], dtype=torch.float64, device=params[0].device)
            if dist.get_backend() == "nccl" and count.device.type != "cuda":
                count = count.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(count)
            n = int(count.item())
            _all_reduce_sum_([p.grad for p in params])
        if n == 0:
            warnings.warn("Sophia: the Hessian refresh found no predictions to sample (every label is "
                          "the ignore index); the Hessian estimate was left unchanged", RuntimeWarning,
                          stacklevel=2)
            return 0
        for p in params:
            p.grad.div_(n)
        if max_grad_norm is not None and max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.update_hessian(bs=n)
    return n
