"""Hutchinson's estimator of the Hessian diagonal: h_hat = u * (H u), E[h_hat] = diag(H).

Two ways to get H u:

* double backward: differentiate (grad . u) once more with ``torch.autograd.grad``;
* forward-over-reverse: ``torch.func.jvp`` of ``torch.func.grad`` (no second backward graph;
  needs a loss written as a function of the parameter tensors).

The estimate can be negative; Sophia's ``max(rho*h, eps)`` handles that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sophia.hessian.probes import check_distribution, probes_like

METHODS = ("double_backward", "forward_over_reverse")


def hutchinson_from_grads(grads: Sequence[Tensor], params: Sequence[Tensor], *,
                          n_probes: int = 1, distribution: str = "rademacher",
                          generator: torch.Generator | None = None,
                          retain_graph: bool = False) -> list[Tensor]:
    """Hutchinson estimate from gradients that still carry their graph.

    ``grads`` must come from ``torch.autograd.grad(loss, params, create_graph=True)`` or
    ``loss.backward(create_graph=True)``. A gradient without a graph (it does not depend on
    any parameter) contributes zero curvature, but if none carries a graph this raises
    ``RuntimeError``: a forgotten ``create_graph=True`` looks the same as a linear loss. Use
    :func:`hutchinson`, which sees the loss, to get zeros for a loss that is linear in (or does
    not depend on) the parameters. The estimates of ``n_probes`` probes are averaged.
    """
    _check_n_probes(n_probes)
    check_distribution(distribution)
    params = list(params)
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters: give one per parameter, "
                         "in the same order (None for a parameter without one)")
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        raise RuntimeError(
            "none of the gradients carries a graph, so no Hessian-vector product can be taken: either they "
            "were computed without create_graph=True, or the loss is linear in these parameters (its gradient "
            "does not depend on them; the Hessian is zero). sophia.hessian.hutchinson(loss_fn, params) tells "
            "the two apart (it returns zeros for a linear loss)")
    est = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for k in range(n_probes):
            u = probes_like(params, distribution, generator)
            hvs = torch.autograd.grad([grads[i] for i in live], params,
                                      grad_outputs=[u[i] for i in live],
                                      retain_graph=retain_graph or k < n_probes - 1,
                                      allow_unused=True)
            for e, ui, hv in zip(est, u, hvs):
                if hv is not None:
                    e.add_(ui * hv.detach())
    if n_probes > 1:
        for e in est:
            e.div_(n_probes)
    return est


def hutchinson(loss_fn: Callable[[Sequence[Tensor]], Tensor], params: Sequence[Tensor], *,
               n_probes: int = 1, distribution: str = "rademacher",
               method: str = "double_backward",
               generator: torch.Generator | None = None) -> list[Tensor]:
    """Hutchinson estimate of diag(H) of ``loss_fn`` at ``params``, one tensor per parameter.

    ``loss_fn(params)`` returns the scalar loss (a real tensor with one element) computed from
    the given parameter tensors; anything else raises ``TypeError`` or ``ValueError``. A loss
    that does not depend on the parameters, or only linearly, has H = 0: the estimate is zeros.
    Nothing is written to ``.grad`` and no graph outlives the call, so it needs no
    ``backward(create_graph=True)``. For an ``nn.Module``:

    >>> import torch
    >>> from sophia.hessian import hutchinson
    >>> model = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> names = [n for n, _ in model.named_parameters()]
    >>> def loss_fn(ps):
    ...     out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
    ...     return ((out - y) ** 2).mean()  # F.mse_loss lacks forward-over-reverse in torch 2.13
    >>> est = hutchinson(loss_fn, list(model.parameters()), method="forward_over_reverse")
    >>> [tuple(e.shape) for e in est]
    [(1, 3), (1,)]

    ``method="double_backward"`` works with any autograd graph (the model's attention must
    support double backward); ``"forward_over_reverse"`` uses ``torch.func`` and requires the
    loss to be a function of the tensors it is given (``functional_call`` as above).
    """
    _check_n_probes(n_probes)
    check_distribution(distribution)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    params = list(params)
    if method == "double_backward":
        with torch.enable_grad():
            loss = _scalar_loss(loss_fn(params))
            if not loss.requires_grad:  # a constant of the parameters: H is exactly zero
                return [torch.zeros_like(p) for p in params]
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        if not any(g is not None and g.requires_grad for g in grads):
            # Gradients that depend on no parameter: the loss is linear and H is exactly zero.
            return [torch.zeros_like(p) for p in params]
        return hutchinson_from_grads(grads, params, n_probes=n_probes,
                                     distribution=distribution, generator=generator)

    primals = tuple(p.detach() for p in params)

    def grad_of(ps: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return torch.func.grad(lambda q: _scalar_loss(loss_fn(list(q))))(ps)

    est = [torch.zeros_like(p) for p in primals]
    for _ in range(n_probes):
        u = tuple(probes_like(primals, distribution, generator))
        try:
            _, hvs = torch.func.jvp(grad_of, (primals,), (u,))
        except RuntimeError as e:
            if "ZeroTensor" not in str(e):
                raise
            raise RuntimeError(
                "forward-over-reverse failed inside torch: some ops (F.mse_loss in torch 2.13, "
                "for one) have no working forward-mode formula for their backward. Write that "
                "part with elementary ops (e.g. ((pred - y) ** 2).mean()) or use "
                "method='double_backward'") from e
        for e, ui, hv in zip(est, u, hvs):
            e.add_(ui * hv)
    if n_probes > 1:
        for e in est:
            e.div_(n_probes)
    return est


def _scalar_loss(loss: object) -> Tensor:
    """The loss as a 0-d real tensor, or an error that says what loss_fn returned instead."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return the loss as a tensor computed from the parameters it is "
                        f"given, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
                         "reduce it first (e.g. .mean() or .sum())")
    if not loss.is_floating_point():
        raise ValueError(f"loss_fn must return a real floating-point loss, got dtype {loss.dtype}")
    return loss.reshape(())


def _check_n_probes(n_probes: int) -> None:
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive int, got {n_probes!r}")
