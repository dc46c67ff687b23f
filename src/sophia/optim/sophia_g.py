"""SophiaG: Sophia with a Gauss-Newton-Bartlett Hessian estimate refreshed by the caller."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from sophia.optim.base import SophiaBase


class SophiaG(SophiaBase):
    r"""Sophia with the Gauss-Newton-Bartlett diagonal Hessian estimate (Liu et al., 2023).

    .. code-block:: text

        every step:      m = b1*m + (1-b1)*g
                         p = p - lr*weight_decay*p
                         p = p - lr*clip(m / max(rho*h, eps), 1)
        after steps k, 2k, ... (hessian_due() is True):
                         (backward of the mean loss over N sampled-label predictions)
                         update_hessian(bs=N):  h = b2*h + (1-b2) * N * grad**2

    ``h`` starts at zero, so until the first :meth:`update_hessian` every coordinate is
    clipped and the step is ``lr * sign(m)`` (sign momentum); this is the authors' behaviour.

    Hyperparameters live in the param groups (per-group ``lr``, ``betas``, ``rho``,
    ``weight_decay``, ``eps``, ``maximize``) and are saved with :meth:`state_dict`. The rho
    values of the authors' scripts transfer unchanged because ``N`` is folded into ``h`` when
    the estimate is taken, where the authors multiply by it at step time.

    State per parameter: ``step`` (float32 scalar tensor), ``exp_avg`` and ``hessian`` (same
    dtype, device and layout as the parameter; bf16 parameters get bf16 state).

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (the largest per-coordinate step is ``lr``).
        betas: (b1, b2), the EMA factors of the gradient and of the Hessian estimate.
        rho: the paper's gamma: scales h in the denominator; larger rho, fewer clipped steps.
        weight_decay: decoupled weight decay, multiplied by ``lr``.
        eps: floor of the denominator ``max(rho*h, eps)``.
        maximize: maximize the objective (negates the gradient in the momentum).
        hessian_interval: k, the steps between Hessian refreshes: :meth:`hessian_due` is True after steps
            k, 2k, ... until :meth:`update_hessian` folds one in (the authors' schedule; k = 10 in their
            scripts). The optimizer keeps the clock (saved in the state dict); the refresh itself is the
            caller's (:func:`sophia.hessian.gnb_refresh`), since it needs the model and a batch.
        foreach: ``True`` selects the multi-tensor (``torch._foreach_*``) path, ``False`` the
            per-tensor loop; ``None`` (default): multi-tensor on CUDA; on CPU as ``fused`` says.
        fused: ``None`` (default, with ``foreach=None``): on CPU a C++ kernel that updates all tensors of a
            group in one vectorised, multi-threaded pass (:mod:`sophia.optim.cpu_kernel`; bitwise equal to the
            per-tensor loop on AVX2/AVX-512 CPUs; its speed against torch's fused AdamW:
            ``benchmarks/results/step-cpu-floor``). It is built on the first step (about 30 s, once: torch's
            extension cache keeps it; needs a C++ compiler and ninja); where it cannot be built, a one-line
            warning and the per-tensor loop. ``True`` selects the compiled path (``torch.compile``; compiles on
            the first step, needs a C++ compiler on CPU or Triton on GPU). ``"triton"`` (opt-in, CUDA): one
            Triton kernel launch for all CUDA tensors of the group (:mod:`sophia.optim.triton_kernel`; bitwise
            equal to the per-tensor loop by construction, not yet measured on a GPU); where Triton is missing,
            and for tensors it does not take, the multi-tensor path. ``False``: no fused kernel, the
            loop or multi-tensor path as ``foreach`` says. All paths compute in float32 (float64 for float64
            parameters), store half-precision results rounded once, and keep the same state dict.
        cuda_graph: ``True`` (CUDA only) replays the compiled update from a captured CUDA graph,
            which removes its Python and launch overhead. It needs the gradients and state at
            fixed addresses from step to step (``zero_grad(set_to_none=False)``); while they
            move, the plain compiled update runs, with a warning.

    Example:
        >>> import torch
        >>> from sophia import SophiaG
        >>> from sophia.hessian import categorical_sampled_loss
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = SophiaG(model.parameters(), lr=1e-3, rho=0.04, weight_decay=0.1, hessian_interval=10)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> for step in range(20):
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        ...     if opt.hessian_due():  # after steps 10 and 20: a Gauss-Newton-Bartlett refresh
        ...         sampled = categorical_sampled_loss(model(x))
        ...         sampled.loss.backward()
        ...         opt.update_hessian(bs=sampled.n)
        ...         opt.zero_grad(set_to_none=True)
        >>> opt.diagnostics()["hessian_updates"]
        2
    """

    _kind = "SophiaG"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        *,
        eps: float = 1e-15,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | str | None = None,
        cuda_graph: bool = False,
        hessian_interval: int = 10,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps,
                        maximize=maximize, foreach=foreach, fused=fused, cuda_graph=cuda_graph,
                        hessian_interval=hessian_interval)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one step with the current gradients and Hessian EMA; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._groups_with_grads()
        for group, params in work:
            self._update_group(group, params)
        if any(params for _, params in work):
            self._steps += 1
        return loss
