"""``sophia train --parallel fsdp``: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), the pieces the
training loop needs and DDP does not.

* :func:`shard_gpt`: ``fully_shard`` on every transformer block, then on the root (embeddings, final norm and
  the tied head), so that one block's weights are gathered at a time; on CUDA with bf16 a mixed-precision
  policy (bf16 weights in compute, fp32 gradient reduction), on CPU plain fp32.
* Reductions over sharded tensors (gradient norm, finiteness) as collectives, so every rank decides alike.
* :class:`HutchinsonReplica`: Sophia-H's Hessian-vector product. FSDP2 does not propagate a second backward
  through its sharded parameters (``autograd.grad(..., create_graph=True)`` returns None for them), so the
  estimate runs on the gathered full weights through an unsharded copy of the module structure (built on
  the meta device, no storage of its own), then each rank keeps the mean over ranks of its shard, by a
  reduce-scatter. While it runs a rank holds one full fp32 copy of the weights and of the estimate: the
  memory of a DDP refresh, for the refresh only.
* :func:`close_process_group`: the end of a rank's group, after gloo's worker threads have let go of every
  collective (the reason is in its docstring).
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_sharded(t: Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return t.to_local() if is_sharded(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor (an all-gather or a reduction for a DTensor: every rank must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def shard_gpt(model: nn.Module, device: torch.device, *, bf16_params: bool) -> None:
    """``fully_shard`` each block and the root of a :class:`sophia.lm.model.GPT`, in place, over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw, root_kw = {"mesh": mesh}, {"mesh": mesh}
    if bf16_params:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # The root's float inputs stay as given: Sophia-G's uniform numbers (forward(x, sample_uniform=u)) in
        # bfloat16 would keep 8 bits and skew the sampled labels. Its other inputs are token ids.
        root_kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                    cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, **kw)
    # The root keeps its weights (embeddings, the tied head) gathered from forward to backward.
    fully_shard(model, **root_kw)


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients in this backward (the last micro-batch) or keep accumulating them unsharded."""
    model.set_requires_gradient_sync(sync)


@contextmanager
def unsharded(model: nn.Module):
    """The module's weights gathered as plain tensors for the block (a collective on entry and exit), so its
    submodules can be called directly (attention statistics)."""
    mods = fsdp_modules(model)
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()


def grad_norm(params: Iterable[Tensor], max_norm: float, device: torch.device) -> Tensor:
    """The global gradient norm over sharded (or plain) gradients, clipping to ``max_norm`` when it is > 0; a
    plain tensor, equal on every rank."""
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return full(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not params:
        return torch.zeros((), device=device)
    squares = torch.stack([local(p.grad).double().pow(2).sum() for p in params]).sum()
    if any(is_sharded(p.grad) for p in params) and dist.is_initialized():
        dist.all_reduce(squares)
    return squares.sqrt().float()


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def shard_mean(estimate: Tensor, like: Tensor) -> Tensor:
    """The mean over ranks of a full-size tensor, kept as the shard that ``like`` (a DTensor) has here: one
    reduce-scatter."""
    from torch.distributed.tensor import DTensor, Partial

    world = like.device_mesh.size()
    summed = DTensor.from_local(estimate, like.device_mesh, [Partial()], run_check=False)
    return summed.redistribute(like.device_mesh, like.placements) / world


def close_process_group(*, drain: bool = True, timeout: float = 60.0) -> None:
    """Destroy the default process group, first letting gloo's worker threads finish with every collective.

    With ``drain`` (the default) every rank must call it at the same point, as it runs collectives; a rank that
    leaves on an error (its peers perhaps inside another collective) passes ``drain=False``: the group is only
    destroyed. Does nothing without a group.

    Why: gloo runs each collective on one of its worker threads (``pt_gloo_runloop``), which drops its reference
    to the finished work, and with it the work's tensors, only after the rank that waited for it has moved on.
    Dropping the last C++ reference to a tensor that has a Python object takes the GIL (and freeing that object
    releases and retakes it). If the rank has meanwhile begun interpreter shutdown, CPython ends the thread with
    ``pthread_exit`` inside torch's ``noexcept`` decref, and the rank dies after its work is done: "terminate
    called without an active exception", SIGABRT (a loaded machine widens the window). ``destroy_process_group``
    does not prevent it once DDP or FSDP2/DTensor has run: they keep the group, and so its threads, alive past it.

    The drain runs rounds of one all-reduce over two fresh tensors, until every rank has seen each of its gloo
    workers free the first tensor (a weak reference's callback runs in the freeing thread). A worker takes its
    next work only after releasing the previous one, so every earlier collective has then been let go; and each
    round waits until the second tensor, released after the first, is back to its own references, so the drain's
    own works are let go too before the group is destroyed. It costs a few milliseconds. NCCL and other backends
    are only destroyed.
    """
    if not dist.is_initialized():
        return
    try:
        workers = _gloo_workers() if drain else 0
        if workers:
            _drain_gloo_workers(workers, timeout)
    finally:
        dist.destroy_process_group()


def _gloo_workers() -> int:
    """How many worker threads the default group's gloo backend runs; 0 for any other backend."""
    if dist.get_backend() != "gloo":
        return 0
    try:
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        return int(backend.options._threads)
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return 2  # gloo's default


def _drain_gloo_workers(workers: int, timeout: float) -> None:
    """See :func:`close_process_group`. Each round's all-reduce (MAX) also carries the verdict: whether some rank
    has not yet seen all its workers; the ranks stop together."""
    me = threading.get_native_id()
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    while True:
        freed_by: list[int] = []
        first = torch.zeros(1)
        second = torch.tensor([float(len(seen) < workers and time.monotonic() < deadline)])
        own_refs = sys.getrefcount(second)
        watch = weakref.ref(first, lambda _, freed_by=freed_by: freed_by.append(threading.get_native_id()))
        dist.group.WORLD.allreduce([first, second], opts)  # neither the work nor ``first`` is kept here
        del first
        # ``second`` is back to its own references once the thread holding the work's last reference has let go of
        # both tensors (``first`` before it); sleeping releases the GIL it needs for that
        while sys.getrefcount(second) > own_refs and time.monotonic() < deadline + timeout:
            time.sleep(0.0005)
        del watch
        seen.update(tid for tid in freed_by if tid != me)
        if not second.item() > 0:
            return


class HutchinsonReplica:
    """An unsharded twin of a sharded GPT for the Hutchinson Hessian-vector product: a module of the same
    structure on the meta device, called with the gathered full weights (``torch.func.functional_call``)."""

    def __init__(self, sharded: nn.Module, config) -> None:
        from sophia.lm.model import GPT

        with torch.device("meta"):
            self.module = GPT(config)
        self.module.set_attention("math")  # double backward needs the explicit attention
        self.names = {id(p): n for n, p in sharded.named_parameters()}

    def estimate(self, params: Sequence[Tensor], loss_of, hutchinson) -> list[Tensor]:
        """Each parameter's Hutchinson estimate on this rank's batch, at the full weights. ``loss_of(module,
        weights)`` computes the loss; the probes are drawn as for unsharded parameters, in ``params`` order."""
        weights = [full(p.detach()).requires_grad_(True) for p in params]
        names = [self.names[id(p)] for p in params]

        def loss_fn(ws):
            return loss_of(self.module, dict(zip(names, ws)))

        return hutchinson(loss_fn, weights)


__all__ = ["HutchinsonReplica", "all_ranks_true", "close_process_group", "full", "grad_norm", "is_sharded", "local",
           "set_gradient_sync", "shard_gpt", "shard_mean", "unsharded"]
