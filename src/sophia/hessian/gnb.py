"""Gauss-Newton-Bartlett (GNB) estimates of the Gauss-Newton diagonal.

For a loss that is the mean negative log-likelihood of an exponential-family output over N
predictions, sample labels from the model's own output distribution, take the gradient g of
the mean sampled-label loss, and use ``N * g**2``: its expectation over the sampled labels is
the diagonal of the Gauss-Newton matrix of the training loss, and it is never negative.

The ``*_sampled_loss`` functions build the sampled-label loss for three output families and
report N; :func:`gnb_refresh` runs a whole refresh for an optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Variance of the Gaussian labels that makes N * g**2 unbiased for the Gauss-Newton diagonal
# of torch's mean squared error (whose per-prediction curvature is 2, not 1).
_MSE_LABEL_VARIANCE = 0.5


class SampledLoss(NamedTuple):
    """A mean loss over ``n`` predictions whose labels were sampled from the model."""

    loss: Tensor
    n: int


def sample_categorical(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Class indices drawn from softmax(logits) along the last dimension: one uniform number per
    prediction from ``generator``, then :func:`sample_categorical_from_uniform`."""
    u = torch.rand(logits.shape[:-1], generator=generator, device=logits.device)
    return sample_categorical_from_uniform(logits, u)


def sample_categorical_from_uniform(logits: Tensor, u: Tensor) -> Tensor:
    """Class indices drawn from softmax(logits) by inverting its CDF at ``u`` (uniform in [0, 1),
    shaped like ``logits[..., 0]``): the first class whose cumulative probability exceeds ``u``.

    No generator and no data-dependent shapes, so it runs inside a compiled graph (the harness
    samples Sophia-G's labels in the model's compiled forward). The softmax and its cumulative sum
    are in float32 (float64 for float64 logits); ``u`` must be float32 or float64 (in bfloat16 it
    would keep 8 bits and coarsen the draw). Limits of float32: a class of probability below about
    2**-24 (6e-8) is drawn with probability 0 or a multiple of 2**-24, which over a batch of
    thousands of predictions differs from exact sampling only in the rare batch that would have
    drawn it; a class of probability 0 is never drawn where the cumulative sum is computed in order
    (eager CPU and CUDA)."""
    if logits.dim() < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits must have a class dimension of size >= 2, got shape {tuple(logits.shape)}")
    if u.shape != logits.shape[:-1]:
        raise ValueError(f"u of shape {tuple(u.shape)} does not match logits {tuple(logits.shape)}")
    if u.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"u must be float32 or float64 (lower precision coarsens the draw), got {u.dtype}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    cdf = torch.softmax(logits.detach().to(dtype), dim=-1).cumsum_(dim=-1)  # in place: one (..., C) temporary
    # u * total rather than u, as the last cumulative sum is 1 only up to rounding; and strictly below the
    # total, so that u = 1 (or a u that rounds to it) still lands on a class of nonzero probability
    total = cdf[..., -1:]
    t = torch.minimum(u.to(dtype).unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, t, right=True).squeeze(-1).clamp_max(logits.shape[-1] - 1)


def categorical_sampled_loss(logits: Tensor, *, mask: Tensor | None = None,
                             generator: torch.Generator | None = None) -> SampledLoss:
    """Cross-entropy of ``logits`` (..., C) against labels sampled from softmax(logits).

    ``mask`` (bool, shaped like ``logits[..., 0]``) keeps only the predictions that the
    training loss counts (e.g. not padding). ``n`` is the number of predictions kept.
    """
    if logits.dim() < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits must have a class dimension of size >= 2, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point (the model's unnormalised scores), got dtype {logits.dtype}; "
                         "labels are sampled from softmax(logits)")
    labels = sample_categorical(logits, generator)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    if mask is not None:
        if mask.shape != logits.shape[:-1]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match logits {tuple(logits.shape)}")
        keep = mask.reshape(-1).bool()
        flat_logits, flat_labels = flat_logits[keep], flat_labels[keep]
    n = flat_labels.numel()
    if n == 0:
        raise ValueError("no predictions to sample: the mask keeps nothing")
    return SampledLoss(F.cross_entropy(flat_logits, flat_labels), n)


def gaussian_sampled_loss(pred: Tensor, generator: torch.Generator | None = None) -> SampledLoss:
    """``F.mse_loss(pred, y)`` with ``y ~ N(pred, 1/2)``: GNB for a mean-squared-error loss."""
    noise = torch.randn(pred.shape, generator=generator, device=pred.device, dtype=pred.dtype)
    target = pred.detach() + noise * _MSE_LABEL_VARIANCE ** 0.5
    return SampledLoss(F.mse_loss(pred, target), pred.numel())


def bernoulli_sampled_loss(logits: Tensor, generator: torch.Generator | None = None) -> SampledLoss:
    """``binary_cross_entropy_with_logits`` against labels ``y ~ Bernoulli(sigmoid(logits))``."""
    target = torch.bernoulli(torch.sigmoid(logits.detach()), generator=generator)
    return SampledLoss(F.binary_cross_entropy_with_logits(logits, target), logits.numel())


def gnb_refresh(optimizer: torch.optim.Optimizer, sampled_loss_fn: Callable[[], SampledLoss], *,
                max_grad_norm: float | None = None, distributed: bool | None = None) -> int:
    """One Gauss-Newton-Bartlett refresh of ``optimizer``'s Hessian EMA; returns N.

    ``sampled_loss_fn()`` runs the forward pass and returns a :class:`SampledLoss` (e.g.
    ``categorical_sampled_loss(model(x))``). Its backward fills ``.grad``; the estimate is
    folded in with ``optimizer.update_hessian(bs=N)``; the gradients that were in ``.grad``
    before the call are put back, so a pending training step is not disturbed.

    Under ``torch.distributed`` (``distributed=None`` means: initialised with more than one
    rank) the forward must run through the DDP-wrapped model, whose backward averages the
    gradients over ranks; N is summed over ranks, and the gradient folded in is that of the mean
    over all N predictions of the global batch (local batches may differ). ``max_grad_norm`` clips
    the sampled-label gradient first (the authors use 1.0). This is the one-micro-batch case of
    :func:`sophia.hessian.refresh.gnb_refresh_micro_batches`, the refresh every loop shares.
    """
    from sophia.hessian.refresh import WrapperAverage, distributed_world, gnb_refresh_micro_batches

    if distributed is None:
        distributed = distributed_world()
    return gnb_refresh_micro_batches(optimizer, [sampled_loss_fn], max_grad_norm=max_grad_norm,
                                     reduction=WrapperAverage() if distributed else None)
