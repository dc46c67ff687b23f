"""The ranks of a run and the parallel wrapper around its model: one process, DDP, or FSDP2 (under torchrun).

:class:`Parallel` is the one place that knows how the ranks share the work: it forms (and closes) the process
group, wraps the GPT (compiled, DDP or sharded), says when gradients are reduced, computes the global gradient
norm, and makes the ranks agree (finite state, stop requests, identical weights at the end). The loop asks it
and never branches on DDP or FSDP itself. The sharded (FSDP2) primitives are in :mod:`sophia.lm.parallel`.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from sophia.lm import parallel
from sophia.lm.config import TrainError
from sophia.lm.device import resolve_device as check_device
from sophia.lm.model import GPT, GPTConfig
from sophia.lm.optimizers import OptimizerEntry


def resolve_device(device_pref: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device ``--device`` names (``auto``: CUDA when present); under torchrun, each rank's own GPU."""
    return check_device(device_pref, allow_auto=True, local_rank=local_rank, world_size=world_size)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is finite, with one host sync per device. Optimizer state can mix devices (a
    step count kept on the CPU beside CUDA moments), so the flags are reduced per device."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all().item()) for f in flags.values())


class Parallel:
    """Rank bookkeeping and the model's parallel wrapper. The process group (torchrun) is formed by
    :meth:`start`, after the data is ready; :meth:`wrap` builds the model; :meth:`close` ends the group."""

    def __init__(self, device_pref: str, timeout_min: float = 30.0, sharded: bool = False) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device_pref, self.local_rank, self.world_size)
        self.timeout_min = timeout_min
        self.enabled = self.world_size > 1
        self.sharded = sharded  # FSDP2: a process group even for one rank (sharding over one, same code path)
        self._owns_group = False
        self.model: torch.nn.Module | None = None  # the module the training step calls (DDP / compiled / sharded)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    # -- the group ------------------------------------------------------------------------------
    def micro_batches_per_rank(self, grad_accum: int) -> int:
        """How many of a step's ``grad_accum`` micro-batches (counted over all ranks) this rank runs; fewer
        micro-batches than ranks: each rank runs one, and the global batch grows (said at start)."""
        if grad_accum >= self.world_size and grad_accum % self.world_size:
            raise TrainError(f"--grad-accum ({grad_accum}) counts micro-batches over all ranks and must be "
                             f"divisible by the number of ranks ({self.world_size})")
        return max(1, grad_accum // self.world_size)

    def start(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        if dist.is_initialized():
            return
        backend = "nccl" if self.cuda else "gloo"
        timeout = datetime.timedelta(minutes=self.timeout_min)
        if self.enabled:
            dist.init_process_group(backend, timeout=timeout)
            self._owns_group = True
        elif self.sharded:  # one process without torchrun: a group of one, no rendezvous needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            self._owns_group = True

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            # Without an error in flight every rank gets here at the same point (a stop request is agreed by all
            # ranks), and gloo's worker threads are drained first (parallel.close_process_group says why); a rank
            # leaving on another error only destroys the group: its peers may be inside another collective.
            from sophia.lm.signals import StopRequestedError

            leaving = sys.exc_info()[1]
            parallel.close_process_group(drain=leaving is None or isinstance(leaving, StopRequestedError)
                                         or self.world_size == 1)

    # -- the model ------------------------------------------------------------------------------
    def wrap(self, config: GPTConfig, optimizer: OptimizerEntry, *, compile: bool, bf16: bool,
             activation_checkpointing: bool) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        """Build the GPT on this rank: ``(model, raw_model, eval_model)``: the module the training step calls,
        the GPT itself (its parameters are the optimizer's; under FSDP2 they are sharded DTensors) and the
        module evaluation calls (compiled when training is, never DDP-wrapped)."""
        if self.sharded:
            # Built whole on the CPU with DDP's initialisation, then sharded onto the devices by fully_shard.
            raw = GPT(config)
            raw.set_activation_checkpointing(activation_checkpointing)
            if compile:  # per block, as FSDP2 wants it: the sharded module's hooks stay outside the graphs
                for block in raw.blocks:
                    block.compile()
            parallel.shard_gpt(raw, self.device, bf16_params=bf16 and self.cuda)
            self.model = raw
            return raw, raw, raw
        raw = GPT(config).to(self.device)
        raw.set_activation_checkpointing(activation_checkpointing)
        model = eval_model = torch.compile(raw) if compile else raw
        if self.enabled:
            if optimizer.second_order_graph:
                raise TrainError(f"{optimizer.name} needs backward(create_graph=True), which DDP does not support")
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.cuda
                                                              else None)
        self.model = model
        return model, raw, eval_model

    def sync(self, last: bool) -> AbstractContextManager:
        """Gradients are reduced across ranks in the last micro-batch's backward only."""
        if self.sharded:
            parallel.set_gradient_sync(self.model, last)
            return nullcontext()
        return self.model.no_sync() if self.enabled and not last else nullcontext()

    def grad_norm(self, params: Iterable[torch.Tensor], clip: float) -> torch.Tensor:
        """The global gradient norm (clipping to ``clip`` when it is > 0), on the device."""
        if self.sharded:
            return parallel.grad_norm(params, clip, self.device)
        params = [p for p in params if p.grad is not None]
        if clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, clip)
        if not params:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))

    # -- agreement between ranks ----------------------------------------------------------------
    def state_is_finite(self, params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer) -> bool:
        """Whether the weights and optimizer state are finite (under FSDP each rank checks its shards, and the
        ranks agree by a collective)."""
        tensors = [parallel.local(p) for p in params]
        for state in optimizer.state.values():
            tensors += [parallel.local(v) for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
        if self.sharded:
            return parallel.all_ranks_true(all_finite(tensors), self.device)
        return all_finite(tensors)

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (a collective when there are several)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t)
        return t

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        if self.enabled:
            for t in tensors:
                dist.all_reduce(t)
                t.div_(self.world_size)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a collective)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def ranks_identical(self, params: Iterable[torch.Tensor]) -> dict[str, Any]:
        """Every rank must hold the same weights: a cheap float64 fingerprint, gathered; the event's fields, or
        TrainError. Under FSDP each weight exists once, in shards: there is nothing to compare."""
        if self.sharded:
            return {"sharded": True, "world_size": self.world_size}
        with torch.no_grad():
            fp = torch.stack([p.double().sum() for p in params]).to(self.device)
        gathered = [torch.empty_like(fp) for _ in range(self.world_size)]
        dist.all_gather(gathered, fp)
        return {"ranks_identical": all(torch.equal(gathered[0], g) for g in gathered[1:]),
                "world_size": self.world_size}


__all__ = ["Parallel", "all_finite", "resolve_device"]
