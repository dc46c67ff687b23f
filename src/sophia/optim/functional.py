"""The Sophia update as pure functions over lists of tensors.

One rule, four implementations that must agree (the C++ kernel bitwise with the for-loop on CPUs where
torch runs its AVX2/AVX-512 kernels; the compiled one within float32 rounding):

    m = b1 * m + (1 - b1) * g                    (g negated when maximizing)
    p = p * (1 - lr * weight_decay)
    p = p - lr * clamp(m / max(rho * h, eps), -1, 1)

``h`` is the running diagonal Hessian estimate (already multiplied by the number of
predictions for Gauss-Newton-Bartlett); refreshing it is done elsewhere
(:func:`hessian_ema`). The C++ kernel (``"cpu-kernel"``) lives in :mod:`sophia.optim.cpu_kernel`, the Triton
kernel for CUDA (``"triton"``) in :mod:`sophia.optim.triton_kernel`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from sophia.optim import cpu_kernel, triton_kernel

__all__ = [
    "IMPLEMENTATIONS",
    "cpu_kernel_usable",
    "hessian_ema",
    "hessian_ema_from_grads",
    "sophia_update",
    "unclipped_count",
]

IMPLEMENTATIONS = ("for-loop", "foreach", "compiled", "cpu-kernel", "triton")


def sophia_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    hessians: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    implementation: str = "foreach",
) -> None:
    """Apply one Sophia step in place to ``params`` and ``exp_avgs``."""
    if implementation == "for-loop":
        fn = _single_tensor
    elif implementation == "foreach":
        fn = _multi_tensor
    elif implementation == "compiled":
        fn = _compiled
    elif implementation == "cpu-kernel":
        fn = _cpu_kernel
    elif implementation == "triton":
        fn = _triton
    else:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    fn(list(params), list(grads), list(exp_avgs), list(hessians),
       float(lr), float(beta1), float(rho), float(weight_decay), float(eps), bool(maximize))


# Half-precision parameters and state are updated with float32 arithmetic and stored back, as torch's fused
# optimizers do: in float16, eps = 1e-15 is 0 (so m = 0 and h = 0 would give 0/0 = nan) and the ratio and the
# decay round at every operation.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update's arithmetic runs in for tensors of ``dtype``."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _single_tensor(params, grads, exp_avgs, hessians, lr, beta1, rho, weight_decay, eps, maximize):
    for p, g, m, h in zip(params, grads, exp_avgs, hessians):
        if p.dtype in _LOW_PRECISION:
            p32, m32 = p.float(), m.float()
            _single_step(p32, g.float(), m32, h.float(), lr, beta1, rho, weight_decay, eps, maximize)
            m.copy_(m32)
            p.copy_(p32)
        else:
            _single_step(p, g, m, h, lr, beta1, rho, weight_decay, eps, maximize)


def _single_step(p, g, m, h, lr, beta1, rho, weight_decay, eps, maximize):
    if maximize:
        g = -g
    m.lerp_(g, 1 - beta1)
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    # max(rho*h, eps): zero or negative curvature becomes eps, so the clip yields a sign step.
    ratio = torch.div(m, h.mul(rho).clamp_(min=eps)).clamp_(-1, 1)
    p.add_(ratio, alpha=-lr)


def _group_by_device_dtype(*lists):
    buckets: dict[tuple, list[list[Tensor]]] = defaultdict(lambda: [[] for _ in lists])
    for items in zip(*lists):
        key = (items[0].device, items[0].dtype)
        for bucket, t in zip(buckets[key], items):
            bucket.append(t)
    return buckets.values()


def _upcast(tensors: list[Tensor]) -> list[Tensor]:
    return [t.float() for t in tensors] if tensors and tensors[0].dtype in _LOW_PRECISION else tensors


def _multi_tensor(params, grads, exp_avgs, hessians, lr, beta1, rho, weight_decay, eps, maximize):
    for ps, gs, ms, hs in _group_by_device_dtype(params, grads, exp_avgs, hessians):
        low = ps[0].dtype in _LOW_PRECISION  # float32 copies, stored back at the end
        stored_ps, stored_ms = ps, ms
        ps, gs, ms, hs = _upcast(ps), _upcast(gs), _upcast(ms), _upcast(hs)
        if maximize:
            gs = torch._foreach_neg(gs)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        denom = torch._foreach_mul(hs, rho)
        torch._foreach_clamp_min_(denom, eps)
        ratio = torch._foreach_div(ms, denom)
        del denom
        torch._foreach_clamp_min_(ratio, -1.0)
        torch._foreach_clamp_max_(ratio, 1.0)
        torch._foreach_add_(ps, ratio, alpha=-lr)
        if low:
            torch._foreach_copy_(stored_ms, ms)
            torch._foreach_copy_(stored_ps, ps)


_PLAIN = (Tensor, torch.nn.Parameter)


def _pick(lists: Sequence[Sequence[Tensor]], indices: Sequence[int]) -> list[list[Tensor]]:
    """The entries at ``indices`` of each of the (params, grads, exp_avgs, hessians) lists."""
    return [[t[i] for i in indices] for t in lists]


def _plain_cpu(t: Tensor) -> bool:
    # tensor subclasses (DTensor, ...) have their own dispatch: they take the per-tensor loop
    return type(t) in _PLAIN and t.is_cpu


def cpu_kernel_usable(params: Sequence[Tensor]) -> bool:
    """Whether the C++ CPU kernel can step ``params`` (plain CPU tensors); builds or loads it on first use
    (a one-line warning and False where no C++ compiler is present)."""
    return bool(params) and all(_plain_cpu(p) for p in params) and cpu_kernel.available()


def _cpu_kernel(params, grads, exp_avgs, hessians, lr, beta1, rho, weight_decay, eps, maximize):
    # One pass over all tensors in C++. The per-tensor loop takes what the kernel does not: parameters that are
    # tensor subclasses (their gradients and state are too), tensors the kernel returns (not contiguous, other
    # dtypes), and everything where the kernel cannot be built.
    lists = (params, grads, exp_avgs, hessians)
    everything = range(len(params))
    mine = [i for i in everything if _plain_cpu(params[i])]
    rest: Sequence[int] = everything
    if mine and cpu_kernel.available():
        skipped = cpu_kernel.sophia_step_(*(lists if len(mine) == len(params) else _pick(lists, mine)), lr=lr,
                                          beta1=beta1, rho=rho, weight_decay=weight_decay, eps=eps, maximize=maximize)
        rest = sorted(set(everything) - set(mine) | {mine[i] for i in skipped})
    if rest:
        _single_tensor(*_pick(lists, rest), lr, beta1, rho, weight_decay, eps, maximize)


def _triton(params, grads, exp_avgs, hessians, lr, beta1, rho, weight_decay, eps, maximize):
    # One Triton launch per (device, dtype) over the plain, contiguous CUDA tensors; the multi-tensor path takes
    # the indices it returns (tensor subclasses, other devices, non-contiguous tensors) and everything where
    # Triton or CUDA is missing.
    rest: Sequence[int] = range(len(params))
    if triton_kernel.available():
        rest = triton_kernel.sophia_step_(params, grads, exp_avgs, hessians, lr=lr, beta1=beta1, rho=rho,
                                          weight_decay=weight_decay, eps=eps, maximize=maximize)
    if rest:
        _multi_tensor(*_pick((params, grads, exp_avgs, hessians), rest), lr, beta1, rho, weight_decay, eps, maximize)


def _compiled_body(params, grads, exp_avgs, hessians, lr, one_minus_beta1, rho, decay, eps, maximize: bool):
    # Hyperparameters arrive as 0-d tensors so that a scheduler changing lr does not recompile.
    # Half-precision tensors in float32 arithmetic (the casts fuse into the kernel), stored back.
    for p, g, m, h in zip(params, grads, exp_avgs, hessians):
        low = p.dtype in (torch.float16, torch.bfloat16)
        pf, gf, mf, hf = (p.float(), g.float(), m.float(), h.float()) if low else (p, g, m, h)
        if maximize:
            gf = -gf
        mf = torch.lerp(mf, gf, one_minus_beta1)
        ratio = torch.div(mf, torch.clamp_min(hf * rho, eps)).clamp(-1, 1)
        m.copy_(mf)
        p.copy_(pf * decay - ratio * lr)


_compiled_fn = None


# The compiled update is specialised on each bucket's dtype, tensor count and maximize: an optimizer with
# several groups, or several optimizers in one process, need more variants than dynamo's default of 8 per
# function, past which a fullgraph compile fails outright.
_RECOMPILE_LIMIT = 64


def _recompile_limit():
    return torch._dynamo.config.patch(recompile_limit=max(_RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit))


def _compiled(params, grads, exp_avgs, hessians, lr, beta1, rho, weight_decay, eps, maximize):
    global _compiled_fn
    if _compiled_fn is None:
        _compiled_fn = torch.compile(_compiled_body, fullgraph=True)
    with _recompile_limit():
        _compiled_buckets(params, grads, exp_avgs, hessians, lr, beta1, rho, weight_decay, eps, maximize)


def _compiled_buckets(params, grads, exp_avgs, hessians, lr, beta1, rho, weight_decay, eps, maximize):
    for ps, gs, ms, hs in _group_by_device_dtype(params, grads, exp_avgs, hessians):
        # float64 parameters get float64 scalars; others float32 (the op math of half types).
        dtype = torch.float64 if ps[0].dtype == torch.float64 else torch.float32
        scalars = torch.tensor([lr, 1 - beta1, rho, 1 - lr * weight_decay, eps], dtype=dtype,
                               device=ps[0].device).unbind()
        _compiled_fn(ps, gs, ms, hs, *scalars, maximize)


class GraphedUpdate:
    """The compiled update of one param group, captured in a CUDA graph and replayed.

    A graph replays fixed memory addresses, so it is valid only while the parameters, their
    gradients and the state keep their storage. The first step with a set of tensors runs the
    compiled update directly (compiling it); a second step with the same addresses captures the
    graph, and later ones replay it, with the hyperparameters written into a small device tensor
    first (a scheduler may change lr every step). When the tensors move, e.g. gradients freed by
    ``zero_grad(set_to_none=True)`` and allocated elsewhere, the update runs without the graph
    until they stay put again.
    """

    def __init__(self) -> None:
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.seen: tuple | None = None
        self.scalars: list[Tensor] = []
        self.moves = 0
        self.replays = 0
        self.failed: tuple | None = None  # tensors whose capture failed: plain compiled steps for them
        self.error: str | None = None

    def __call__(self, params, grads, exp_avgs, hessians, *, lr, beta1, rho, weight_decay, eps,
                 maximize) -> None:
        values = [float(lr), 1 - float(beta1), float(rho), 1 - float(lr) * float(weight_decay), float(eps)]
        key = (tuple(t.data_ptr() for t in params), tuple(t.data_ptr() for t in grads),
               tuple(t.data_ptr() for t in exp_avgs), tuple(t.data_ptr() for t in hessians), bool(maximize))
        device = params[0].device

        def plain() -> None:
            _compiled(list(params), list(grads), list(exp_avgs), list(hessians), float(lr), float(beta1),
                      float(rho), float(weight_decay), float(eps), bool(maximize))

        if self.graph is not None and key == self.key:
            self._write(values)
            with torch.cuda.device(device):
                self.graph.replay()
            self.replays += 1
            return
        one_device = all(t.device == device for t in params)
        if key != self.seen or key == self.failed or not one_device:
            # new addresses: a plain compiled step (it also compiles and warms up)
            if self.seen is not None:
                self.moves += 1
            self.seen, self.graph, self.key = key, None, None
            plain()
            return
        buckets = list(_group_by_device_dtype(list(params), list(grads), list(exp_avgs), list(hessians)))
        self.scalars = [torch.zeros(5, dtype=torch.float64 if ps[0].dtype == torch.float64 else torch.float32,
                                    device=device) for ps, *_ in buckets]
        self._write(values)
        try:
            with torch.cuda.device(device):
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                # a stream of the parameters' device; thread_local: other threads' CUDA calls are not the capture's
                with torch.cuda.graph(graph, stream=torch.cuda.Stream(device), capture_error_mode="thread_local"), \
                        _recompile_limit():
                    for (ps, gs, ms, hs), sc in zip(buckets, self.scalars):
                        _compiled_fn(ps, gs, ms, hs, *sc.unbind(), bool(maximize))  # recorded, not run
        except Exception as e:  # nothing ran during the capture: take this step without a graph
            self.failed, self.graph, self.key = key, None, None
            self.error = f"{type(e).__name__}: {e}"
            plain()
            return
        self.graph, self.key = graph, key
        with torch.cuda.device(device):
            graph.replay()
        self.replays += 1

    def _write(self, values: list[float]) -> None:
        for sc in self.scalars:
            sc.copy_(torch.tensor(values, dtype=sc.dtype))  # from pageable memory: staged before it returns


def hessian_ema(hessians: Sequence[Tensor], estimates: Sequence[Tensor], beta2: float) -> None:
    """h = beta2 * h + (1 - beta2) * estimate, in place, for each pair (half precision: float32 arithmetic)."""
    for stored, es in _group_by_device_dtype(list(hessians), list(estimates)):
        hs, es = _upcast(stored), _upcast(es)
        torch._foreach_mul_(hs, beta2)
        torch._foreach_add_(hs, es, alpha=1 - beta2)
        if hs is not stored:
            torch._foreach_copy_(stored, hs)


def hessian_ema_from_grads(hessians: Sequence[Tensor], grads: Sequence[Tensor], beta2: float,
                           scale: float) -> None:
    """h = beta2 * h + (1 - beta2) * scale * g * g, in place (Gauss-Newton-Bartlett refresh; half precision:
    float32 arithmetic)."""
    for stored, gs in _group_by_device_dtype(list(hessians), list(grads)):
        hs, gs = _upcast(stored), _upcast(gs)
        torch._foreach_mul_(hs, beta2)
        torch._foreach_addcmul_(hs, gs, gs, value=(1 - beta2) * scale)
        if hs is not stored:
            torch._foreach_copy_(stored, hs)


def unclipped_count(exp_avgs: Sequence[Tensor], hessians: Sequence[Tensor], rho: float,
                    eps: float) -> Tensor:
    """Number of coordinates with |m| < max(rho * h, eps): those the clip leaves alone."""
    total = None
    for m, h in zip(exp_avgs, hessians):
        m, h = m.to(_opmath(m.dtype)), h.to(_opmath(h.dtype))  # as the update compares them
        n = (m.abs() < h.mul(rho).clamp_(min=eps)).sum()
        total = n if total is None else total + n.to(total.device)
    return total if total is not None else torch.tensor(0)
