"""The curvature refresh of ``sophia train``: when and how an optimizer's diagonal Hessian estimate is refreshed,
chosen once from its registry entry (:class:`sophia.lm.optimizers.OptimizerEntry`).

* :class:`NoRefresh`: first-order optimizers.
* :class:`GaussNewtonBartlettRefresh` (Sophia-G): after the steps its optimizer's clock marks (k, 2k, ...), a
  sampled-label backward over the global batch (or a fraction of it) through the shared refresh
  (:func:`sophia.hessian.refresh.gnb_refresh_micro_batches`), the labels drawn inside the (compiled) forward.
* :class:`HutchinsonRefresh` (Sophia-H): before its refresh steps, a Hutchinson estimate on a fresh batch,
  averaged over ranks, handed to the optimizer.
* :class:`SecondOrderGraph` (AdaHessian): the optimizer differentiates the gradients in its own ``step()``; the
  training backward keeps its graph on its Hessian steps.

Each returns the forward/backward passes it spent, in units of a training micro-batch, for the run's counters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from sophia.hessian import SampledLoss, hutchinson
from sophia.hessian.refresh import (
    AllReduceSum,
    HutchinsonAverage,
    WrapperAverage,
    gnb_refresh_micro_batches,
    label_generator,
)
from sophia.lm import parallel
from sophia.lm.distributed import Parallel
from sophia.lm.optimizers import OptimizerEntry

Batch = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # batch_size -> (x, y) on the device


def in_forward_sampled_losses(model: torch.nn.Module, inputs: Sequence[Callable[[], torch.Tensor]],
                              generator_for: Callable[[int], torch.Generator],
                              autocast: Any = None) -> list[Callable[[], SampledLoss]]:
    """Sophia-G's sampled-label losses as ``sophia train`` computes them, one callable per micro-batch for the
    shared refresh: ``inputs[m]()`` gives micro-batch m's tokens (B, T) (read when the refresh reaches it),
    one uniform number per position comes from ``generator_for(m)``, and the harness's GPT draws the labels
    from them inside its (compiled) forward. Every position is a prediction: n = B * T."""
    def one(micro: int) -> Callable[[], SampledLoss]:
        def sampled_loss() -> SampledLoss:
            x = inputs[micro]()
            u = torch.rand(x.shape, generator=generator_for(micro), device=x.device)
            with autocast if autocast is not None else nullcontext():
                _, loss = model(x, sample_uniform=u)
            return SampledLoss(loss, x.numel())
        return sampled_loss
    return [one(m) for m in range(len(inputs))]


class CurvatureRefresh:
    """No refresh: the hooks of a training step do nothing and cost nothing."""

    def before_step(self, step: int) -> float:
        """Before training step ``step`` (0-based); the passes spent."""
        return 0.0

    def create_graph(self, step: int) -> bool:
        """Whether training step ``step``'s backward keeps its graph (the optimizer differentiates it)."""
        return False

    def after_step(self, step: int) -> float:
        """After training step ``step`` (0-based) was taken or skipped; the passes spent."""
        return 0.0


NoRefresh = CurvatureRefresh


class _Refresh(CurvatureRefresh):
    def __init__(self, optimizer: torch.optim.Optimizer, ranks: Parallel, batch: Batch, *, batch_size: int,
                 fraction: float, autocast: AbstractContextManager) -> None:
        self.opt = optimizer
        self.ranks = ranks
        self.batch = batch
        self.batch_size = batch_size
        self.fraction = fraction
        self.autocast = autocast

    @property
    def fraction_size(self) -> int:
        """The micro-batch size of a refresh at ``--hessian-batch-fraction``."""
        return max(1, round(self.batch_size * self.fraction))


class GaussNewtonBartlettRefresh(_Refresh):
    def __init__(self, optimizer: torch.optim.Optimizer, ranks: Parallel, batch: Batch, *, model: torch.nn.Module,
                 batch_size: int, fraction: float, micro_batches: int, seed: int, max_grad_norm: float | None,
                 autocast: AbstractContextManager) -> None:
        super().__init__(optimizer, ranks, batch, batch_size=batch_size, fraction=fraction, autocast=autocast)
        self.model = model
        self.micro_batches = micro_batches
        self.seed = seed
        self.max_grad_norm = max_grad_norm

    def after_step(self, step: int) -> float:
        """After steps k, 2k, ... by the optimizer's own clock: the refresh of completed step ``step + 1``."""
        return self.refresh(step + 1) if self.opt.hessian_due() else 0.0

    def refresh(self, step: int) -> float:
        """Sampled-label backward over the whole (or a fraction of the) global batch, then N*g**2, after
        optimizer step ``step`` (1-based), by the shared refresh (sophia.hessian.refresh): the DDP/FSDP
        wrapper reduces, the labels are drawn inside the (compiled) forward from the package's label
        generator of (seed, step, rank, micro-batch).

        A fraction that is a whole number of micro-batches (1/4 of 8) runs that many micro-batches of the
        training shape, as the authors' code refreshes on one micro-batch: a compiled model sees no new
        shape and the device runs at its training batch size. Otherwise each micro-batch shrinks."""
        whole = self.fraction * self.micro_batches
        if self.micro_batches > 1 and whole >= 1 and abs(whole - round(whole)) < 1e-9:
            n_micro, bs = round(whole), self.batch_size
        else:
            n_micro, bs = self.micro_batches, self.fraction_size
        ranks = self.ranks
        losses = in_forward_sampled_losses(self.model, [lambda: self.batch(bs)[0]] * n_micro,
                                           lambda micro: label_generator(ranks.device, self.seed, step, ranks.rank,
                                                                         micro),
                                           self.autocast)
        gnb_refresh_micro_batches(self.opt, losses, reduction=WrapperAverage(ranks.sync) if ranks.enabled else None,
                                  max_grad_norm=self.max_grad_norm)
        return n_micro * ranks.world_size * bs / self.batch_size


class HutchinsonRefresh(_Refresh):
    def __init__(self, optimizer: torch.optim.Optimizer, ranks: Parallel, batch: Batch, *, gpt: torch.nn.Module,
                 batch_size: int, fraction: float, autocast: AbstractContextManager) -> None:
        super().__init__(optimizer, ranks, batch, batch_size=batch_size, fraction=fraction, autocast=autocast)
        self.gpt = gpt
        # under FSDP2 the Hessian-vector product runs on an unsharded twin, called with the gathered weights
        self.replica = parallel.HutchinsonReplica(gpt, gpt.config) if ranks.sharded else None

    def before_step(self, step: int) -> float:
        return self.refresh() if self.opt.hessian_due() else 0.0

    def refresh(self) -> float:
        """A Hutchinson estimate on a fresh batch, averaged over ranks, handed to the optimizer."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        x, y = self.batch(self.fraction_size)
        if self.replica is not None:
            def loss_of(module, weights):
                with self.autocast:
                    return torch.func.functional_call(module, weights, (x, y))[1]

            est = self.replica.estimate(params, loss_of, hutchinson)
            est = [parallel.shard_mean(e, p) for e, p in zip(est, params)]
        else:
            def loss_fn(ps):  # the parameters are the module's own: plain autograd, no functional call needed
                with self.autocast:
                    return self.gpt(x, y)[1]

            with self.gpt.use_attention("math"):
                average = HutchinsonAverage(params)
                average.add(hutchinson(loss_fn, params), x.numel())
            est = average.result(AllReduceSum() if self.ranks.enabled else None)
        self.opt.update_hessian(estimates=est)
        # a forward and backward with graph, then the Hessian-vector product (about one more backward)
        return 2 * self.ranks.world_size * self.fraction_size / self.batch_size


class SecondOrderGraph(CurvatureRefresh):
    """The optimizer's own Hessian steps (AdaHessian): the training backward keeps its graph then, and the
    Hessian-vector product inside ``step()`` costs about one more backward per micro-batch."""

    def __init__(self, entry: OptimizerEntry, interval: int, micro_batches: int, ranks: Parallel) -> None:
        self.entry = entry
        self.interval = interval
        self.passes = micro_batches * ranks.world_size

    def create_graph(self, step: int) -> bool:
        return self.entry.create_graph(step, self.interval)

    def after_step(self, step: int) -> float:
        return float(self.passes) if self.create_graph(step) else 0.0


def curvature_refresh(entry: OptimizerEntry, optimizer: torch.optim.Optimizer, ranks: Parallel, batch: Batch, *,
                      model: torch.nn.Module, gpt: torch.nn.Module, cfg: Any, micro_batches: int,
                      autocast: AbstractContextManager) -> CurvatureRefresh:
    """The refresh ``entry`` needs: ``model`` is what the training step calls (DDP / compiled), ``gpt`` the GPT
    itself; ``cfg`` a TrainConfig (batch size, --hessian-batch-fraction, --hessian-interval, seed, grad clip)."""
    if entry.refresh == "gnb":
        return GaussNewtonBartlettRefresh(optimizer, ranks, batch, model=model, batch_size=cfg.batch_size,
                                          fraction=cfg.hessian_batch_fraction, micro_batches=micro_batches,
                                          seed=cfg.seed, max_grad_norm=cfg.grad_clip if cfg.grad_clip > 0 else None,
                                          autocast=autocast)
    if entry.refresh == "hutchinson":
        return HutchinsonRefresh(optimizer, ranks, batch, gpt=gpt, batch_size=cfg.batch_size,
                                 fraction=cfg.hessian_batch_fraction, autocast=autocast)
    if entry.second_order_graph:
        return SecondOrderGraph(entry, cfg.hessian_interval, micro_batches, ranks)
    return NoRefresh()


__all__ = ["CurvatureRefresh", "GaussNewtonBartlettRefresh", "HutchinsonRefresh", "NoRefresh", "SecondOrderGraph",
           "curvature_refresh", "in_forward_sampled_losses"]
