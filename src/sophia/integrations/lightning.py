"""Sophia in PyTorch Lightning: :class:`SophiaCallback`.

Install with ``pip install "sophia-lab[lightning]"`` (``lightning``; the older
``pytorch_lightning`` package name works too). Return a :class:`~sophia.SophiaG` from
``configure_optimizers`` and add the callback::

    trainer = lightning.Trainer(callbacks=[SophiaCallback(hessian_interval=10)], ...)

How it hooks in: ``on_train_batch_start`` / ``on_train_batch_end`` see every batch and the
optimizer-step counter (``trainer.global_step``); the batches of an optimizer step that ends
with a refresh are kept, and the refresh runs in ``on_train_batch_end`` of the batch whose
optimizer step completed the count, before Lightning's ``ModelCheckpoint`` (which it always
runs last) can save. The optimizer's ``state_dict`` (``exp_avg``, ``hessian``, counters) is
in Lightning's checkpoints; the callback's own settings are in its ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sophia.hessian import SampledLoss
from sophia.hessian.refresh import AllReduceSum, gnb_refresh_micro_batches, label_generator, sampled_categorical
from sophia.optim import SophiaG

try:
    from lightning.pytorch import Callback
except ImportError:
    try:  # the package's older name
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError("sophia.integrations.lightning needs Lightning, which is not installed: "
                          "pip install 'sophia-lab[lightning]'") from None

__all__ = ["SophiaCallback"]

LogitsFn = Callable[[Any, Any], "Tensor | tuple[Tensor, Tensor]"]


def _default_logits_fn(pl_module: Any, batch: Any) -> Tensor:
    try:
        out = pl_module(batch)
    except Exception as e:
        if isinstance(batch, (tuple, list)):  # the usual (inputs, labels) batch, which forward does not take whole
            raise TypeError(
                f"SophiaCallback: the default logits_fn calls pl_module(batch), which failed on a batch of "
                f"{len(batch)} items ({type(e).__name__}: {e}). Tell the callback how to get logits from a batch, "
                "e.g. SophiaCallback(logits_fn=lambda module, batch: (module(batch[0]), batch[1])) (the labels mark "
                "the positions that count; return the logits alone if all count)") from e
        raise
    if not isinstance(out, Tensor):
        raise TypeError(f"SophiaCallback: the default logits_fn calls pl_module(batch), which returned "
                        f"{type(out).__name__}, not a logits tensor; pass logits_fn=... returning the logits "
                        "(or (logits, labels))")
    return out


class SophiaCallback(Callback):
    """Refreshes a SophiaG's Hessian estimate on the authors' schedule inside ``lightning.Trainer``.

    After every k-th optimizer step (the optimizer's ``hessian_due()``, which it is given ``hessian_interval``
    for; with ``accumulate_grad_batches`` the step counts once per accumulated batch) the refresh runs
    the model on the same batches that step was trained on, samples labels from its output,
    back-propagates the mean cross-entropy over all N predictions (every batch of the step, every
    rank), clips it, and folds in ``update_hessian(bs=N)``. The training gradients still in
    ``.grad`` at that point (Lightning zeroes them only at the next step's first batch) are put
    back unchanged.

    Args:
        hessian_interval: k, the optimizer steps between refreshes: set on the optimizer, which keeps the
            schedule. ``None`` (default): the optimizer's own (``SophiaG(hessian_interval=...)``, 10 by default).
        logits_fn: ``logits_fn(pl_module, batch)`` returns the model's logits (``(..., C)``) for
            the batch, or a pair ``(logits, labels)`` whose labels mark the predictions the
            training loss counts: positions equal to ``ignore_index`` are neither sampled nor
            counted. Default: ``pl_module(batch)``, every position counts.
        ignore_index: the label of positions that are not predictions.
        max_grad_norm: clip the sampled-label gradient at this norm (the authors use the
            training clip, 1.0). ``None`` (default): the trainer's ``gradient_clip_val`` when it
            clips by norm, else no clip.
        seed: labels are sampled from a generator seeded with (seed, step, rank), so a resumed
            run repeats the uninterrupted one. ``None``: ``torch.initial_seed()`` at fit start
            (``seed_everything`` sets it); kept in the callback's ``state_dict``.
        log_diagnostics: log ``win_rate``, ``hessian_norm`` and ``hessian_updates`` with
            ``pl_module.log`` on the steps Lightning writes its logs.

    Under DDP the refresh runs the LightningModule itself (not the DDP wrapper, whose forward
    is ``training_step``) and sums gradients and N over ranks. FSDP/DeepSpeed are not supported.
    """

    def __init__(self, hessian_interval: int | None = None, logits_fn: LogitsFn | None = None, *,
                 ignore_index: int = -100, max_grad_norm: float | None = None, seed: int | None = None,
                 log_diagnostics: bool = True) -> None:
        super().__init__()
        if hessian_interval is not None and (isinstance(hessian_interval, bool) or not isinstance(
                hessian_interval, int) or hessian_interval < 1):
            raise ValueError(f"hessian_interval must be None or an int >= 1, got {hessian_interval!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be None or > 0, got {max_grad_norm!r}")
        self.hessian_interval = hessian_interval
        self.logits_fn = logits_fn or _default_logits_fn
        self.ignore_index = ignore_index
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.log_diagnostics = log_diagnostics
        self.refreshes: list[tuple[int, int]] = []  # (global_step, N) of each refresh in this process
        self._steps_at_batch_start = 0
        self._due_after_this_step = False
        self._window: list[Any] = []
        self._window_step = -1

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"hessian_interval": self.hessian_interval, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("hessian_interval", self.hessian_interval)
        if self.hessian_interval is not None and saved is not None and saved != self.hessian_interval:
            raise ValueError(f"the checkpoint was trained with hessian_interval={state_dict['hessian_interval']}, "
                             f"this SophiaCallback has {self.hessian_interval}")
        if self.seed is None:
            self.seed = state_dict.get("seed")

    # -- hooks -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1 or not isinstance(trainer.optimizers[0], SophiaG):
            kinds = [type(o).__name__ for o in trainer.optimizers]
            raise TypeError(f"SophiaCallback needs configure_optimizers to return one SophiaG, got {kinds}. "
                            "(SophiaH refreshes itself: see the README's SophiaH section.)")
        if self.seed is None:
            self.seed = torch.initial_seed()
        optimizer = trainer.optimizers[0]
        if self.hessian_interval is not None:  # the optimizer keeps the schedule
            for group in optimizer.param_groups:
                group["hessian_interval"] = self.hessian_interval
        else:
            self.hessian_interval = min(g["hessian_interval"] for g in optimizer.param_groups)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        optimizer = trainer.optimizers[0]
        self._steps_at_batch_start = optimizer.steps
        self._due_after_this_step = optimizer.hessian_due(steps_ahead=1)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        optimizer = trainer.optimizers[0]
        target = self._steps_at_batch_start + 1  # the optimizer step this batch was trained for
        if self._due_after_this_step:
            if self._window_step != target:
                self._window, self._window_step = [], target
            self._window.append(batch)
        if optimizer.steps == self._steps_at_batch_start:
            return  # accumulating: no optimizer step in this batch
        if optimizer.hessian_due():
            window, self._window = self._window, []
            if self._window_step != optimizer.steps or not window:
                raise RuntimeError(f"SophiaCallback: optimizer step {optimizer.steps} is due a Hessian refresh but "
                                   "its batches were not seen")
            step = trainer.global_step  # the label stream's step, as before the optimizer kept the clock
            self.refreshes.append((step, self.refresh(trainer, pl_module, window, step)))
        if self.log_diagnostics and _writes_logs_now(trainer):
            diagnostics = trainer.optimizers[0].diagnostics()
            for key in ("win_rate", "hessian_norm", "hessian_updates"):
                pl_module.log(key, float(diagnostics[key]), on_step=True, on_epoch=False, batch_size=1)

    # -- the refresh -----------------------------------------------------------------------
    def sampled_loss(self, pl_module: Any, batch: Any, generator: torch.Generator) -> SampledLoss:
        """The mean cross-entropy against labels sampled from ``logits_fn``'s output."""
        out = self.logits_fn(pl_module, batch)
        logits, labels = out if isinstance(out, tuple) else (out, None)
        return sampled_categorical(logits, labels, ignore_index=self.ignore_index, generator=generator)

    def refresh(self, trainer: Any, pl_module: Any, batches: list[Any], step: int) -> int:
        """Fold one Gauss-Newton-Bartlett estimate over ``batches`` into the optimizer; returns N."""
        optimizer = trainer.optimizers[0]
        device = next(p for g in optimizer.param_groups for p in g["params"]).device
        max_norm = self.max_grad_norm
        if max_norm is None and trainer.gradient_clip_val and trainer.gradient_clip_algorithm in (None, "norm"):
            max_norm = float(trainer.gradient_clip_val)

        def one(micro: int, batch: Any) -> Callable[[], SampledLoss]:
            def run() -> SampledLoss:
                generator = label_generator(device, int(self.seed), step, trainer.global_rank, micro)
                with trainer.precision_plugin.train_step_context():
                    return self.sampled_loss(pl_module, batch, generator)
            return run

        # the LightningModule's own forward (the DDP wrapper's is training_step): gradients summed here
        return gnb_refresh_micro_batches(optimizer, [one(i, b) for i, b in enumerate(batches)],
                                         max_grad_norm=max_norm, reduction=AllReduceSum())


def _writes_logs_now(trainer: Any) -> bool:
    """Whether Lightning writes this step's logged metrics to its loggers."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))
