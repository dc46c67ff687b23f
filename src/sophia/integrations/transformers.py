"""Sophia in the Hugging Face ``transformers.Trainer``: :class:`SophiaTrainer`.

Install with ``pip install "sophia-lab[hf]"``. Use it where you would use ``Trainer``::

    from sophia.integrations.transformers import SophiaTrainer

    trainer = SophiaTrainer(model=model, args=training_args, train_dataset=train,
                            data_collator=collator, rho=0.05, hessian_interval=10)
    trainer.train()

How it hooks in:

* ``create_optimizer``: SophiaG (or SophiaH) over Trainer's own decay / no-decay split, with
  ``learning_rate`` and ``weight_decay`` from ``TrainingArguments``; warm-up and schedule are
  Trainer's, untouched.
* ``training_step``: every micro-batch of an optimizer step that ends with a Hessian refresh is
  kept (SophiaG), or gets its Hutchinson estimate (SophiaH). Callbacks do not see batches, so this
  is the place.
* a ``TrainerCallback`` that Trainer calls after the optimizer step (``on_step_end``, before it
  logs or saves) runs the SophiaG refresh, and before the step (``on_pre_optimizer_step``) folds
  in the SophiaH estimate. Checkpoints therefore hold the refreshed state, and the optimizer's
  ``state_dict`` (``exp_avg``, ``hessian``, counters) travels in Trainer's ``optimizer.pt``.
* ``log``: ``win_rate``, ``hessian_norm`` and ``hessian_updates`` join the training logs.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:
    if getattr(e, "name", None) not in ("transformers", "accelerate"):
        raise
    raise ImportError(f"sophia.integrations.transformers needs {e.name}, which is not installed: "
                      "pip install 'sophia-lab[hf]'") from None

from sophia.hessian import SampledLoss, bernoulli_sampled_loss, gaussian_sampled_loss, hutchinson
from sophia.hessian.refresh import (
    AllReduceSum,
    HutchinsonAverage,
    distributed_world,
    gnb_refresh_micro_batches,
    label_generator,
    prediction_mask,
    sampled_categorical,
)
from sophia.optim import SophiaG, SophiaH
from sophia.optim.base import SophiaBase

__all__ = ["SophiaTrainer"]

IGNORE_INDEX = -100  # transformers' label for "not a prediction" (padding, prompts)
_KINDS = {"sophiag": SophiaG, "sophiah": SophiaH}


def _loss_shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss compares logits[..., i, :] with labels[..., i + 1] (causal LMs)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

        loss_type = getattr(model, "loss_type", None)
        if loss_type is not None:
            return LOSS_MAPPING.get(loss_type) is ForCausalLMLoss
    except (ImportError, AttributeError):
        pass
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _math_attention():
    """Scaled-dot-product attention on its math path, which supports double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


class _SophiaSteps(TrainerCallback):
    """Trainer's hooks around the optimizer step, forwarded to the SophiaTrainer that owns this."""

    def __init__(self, trainer: SophiaTrainer) -> None:
        self._trainer = weakref.ref(trainer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._before_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._after_optimizer_step()


class SophiaTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with Sophia and keeps its Hessian estimate fresh.

    Takes Trainer's arguments, plus:

    Args:
        sophia: ``"sophiag"`` (Gauss-Newton-Bartlett, default) or ``"sophiah"`` (Hutchinson).
        rho: the optimizer's rho (the paper's gamma); ``None`` keeps the optimizer's default.
        hessian_interval: k, the optimizer steps between Hessian refreshes, given to the optimizer, which keeps
            the schedule (``hessian_due()``). ``None`` (default): 10, or the interval of a Sophia optimizer
            passed in.
        betas: (b1, b2) of the optimizer; ``None`` keeps Sophia's (0.965, 0.99). Trainer's
            ``adam_beta1``/``adam_beta2`` belong to Adam and are not used.

    Learning rate, weight decay (on Trainer's decay / no-decay split), warm-up, schedule and
    ``max_grad_norm`` come from ``TrainingArguments`` as they do for AdamW. A Sophia optimizer
    passed in ``optimizers=(opt, scheduler)`` is used as given (it must match ``sophia``).

    **SophiaG**: the authors' schedule counted in optimizer steps: after every k-th optimizer
    step (when the optimizer's ``hessian_due()``), before Trainer logs or saves, the refresh takes
    the same micro-batches that step was trained on, runs the model on them without their labels,
    samples labels from its output and back-propagates the mean cross-entropy over all N
    predictions of the step (every micro-batch, every rank), clips that gradient at
    ``max_grad_norm`` and folds in ``update_hessian(bs=N)``. Positions whose label is -100 are
    not predictions: not sampled, not counted. For causal LMs the labels are shifted as the
    model's loss does; ``shift_labels`` in the batch is used as given. Models with
    ``problem_type`` ``"regression"`` or ``"multi_label_classification"`` get the Gaussian or
    Bernoulli estimator. Override :meth:`sampled_loss` for anything else.

    **SophiaH**: on the optimizer steps where the optimizer refreshes (``hessian_due()``), each
    micro-batch's loss (``compute_loss``) gets a Hutchinson estimate from
    :func:`sophia.hutchinson` (double backward inside the call, attention on its math path; the
    training backward stays first-order). The estimates are averaged with the micro-batches'
    prediction counts as weights, over ranks too, and handed to ``update_hessian(estimates=...)``
    just before the step.

    Labels are sampled (and probes drawn) from a generator seeded with (``args.seed``, step,
    rank), so a run resumed from a checkpoint repeats the uninterrupted one. Under DDP the
    refresh runs the model's own forward on each rank and sums the gradients and N over ranks
    itself; FSDP and DeepSpeed are refused.
    """

    def __init__(self, *args: Any, sophia: str = "sophiag", rho: float | None = None,
                 hessian_interval: int | None = None, betas: tuple[float, float] | None = None,
                 **kwargs: Any) -> None:
        if sophia not in _KINDS:
            raise ValueError(f"sophia must be one of {sorted(_KINDS)}, got {sophia!r}")
        if hessian_interval is not None and (isinstance(hessian_interval, bool) or not isinstance(
                hessian_interval, int) or hessian_interval < 1):
            raise ValueError(f"hessian_interval must be None or an int >= 1, got {hessian_interval!r}")
        if rho is not None and not (isinstance(rho, (int, float)) and rho >= 0):
            raise ValueError(f"rho must be None or a number >= 0, got {rho!r}")
        self.sophia = sophia
        self.sophia_rho = rho
        self.sophia_betas = betas
        self.hessian_interval = hessian_interval
        self._window: list[Mapping[str, Any]] = []
        self._window_step = -1
        self._estimates: HutchinsonAverage | None = None
        self._estimate_step = -1
        self._estimate_micro = 0
        self.hessian_refreshes: list[tuple[int, int]] = []  # (global_step, N) of each SophiaG refresh
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("SophiaTrainer supports single-device and DDP training; FSDP and DeepSpeed "
                             "shard the parameters, which its Hessian refresh does not handle")
        self.add_callback(_SophiaSteps(self))

    # -- the optimizer ------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        cls = _KINDS[self.sophia]
        if self.optimizer is None:
            if getattr(self, "optimizer_cls_and_kwargs", None) is not None:
                raise ValueError("SophiaTrainer creates its own optimizer: do not pass optimizer_cls_and_kwargs")
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            options: dict[str, Any] = {"lr": self.args.learning_rate}
            if self.sophia_rho is not None:
                options["rho"] = self.sophia_rho
            if self.sophia_betas is not None:
                options["betas"] = tuple(self.sophia_betas)
            options["hessian_interval"] = self.hessian_interval or 10
            self.optimizer = cls([g for g in groups if g["params"]], **options)
        else:
            given = self.sophia_optimizer
            if not isinstance(given, cls):
                raise ValueError(f"SophiaTrainer(sophia={self.sophia!r}) needs a {cls.__name__}, but the "
                                 f"optimizer passed in is a {type(given).__name__}")
            if self.hessian_interval is not None and any(g["hessian_interval"] != self.hessian_interval
                                                          for g in given.param_groups):
                raise ValueError(f"the {cls.__name__} passed in refreshes every "
                                 f"{sorted({g['hessian_interval'] for g in given.param_groups})} steps "
                                 f"(its hessian_interval), but SophiaTrainer has hessian_interval="
                                 f"{self.hessian_interval}; give them the same")
        return self.optimizer

    @property
    def sophia_optimizer(self) -> SophiaBase:
        """The SophiaG / SophiaH inside Trainer's (possibly accelerate-wrapped) optimizer."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, SophiaBase) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        if not isinstance(opt, SophiaBase):
            raise ValueError(f"SophiaTrainer's optimizer is a {type(opt).__name__}, not SophiaG / SophiaH")
        return opt

    # -- the batches --------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        step = self.state.global_step + 1  # the optimizer step this micro-batch is trained for
        opt = self.sophia_optimizer
        if self.sophia == "sophiag":
            if opt.hessian_due(steps_ahead=1):  # the refresh after this step reads the step's micro-batches
                target = opt.steps + 1
                if self._window_step != target:
                    self._window, self._window_step = [], target
                self._window.append(inputs)
        elif opt.hessian_due():
            self._add_hutchinson_estimate(model, inputs, step)
        return super().training_step(model, inputs, num_items_in_batch)

    def _targets(self, model: nn.Module, inputs: Mapping[str, Any], logits: Tensor | None = None
                 ) -> tuple[Tensor | None, Tensor | None]:
        """(logits, labels) aligned as the model's loss aligns them; either may be None."""
        if "shift_labels" in inputs:
            return logits, inputs["shift_labels"]
        labels = inputs.get("labels")
        if labels is not None and _loss_shifts_labels(model):
            return (None if logits is None else logits[..., :-1, :]), labels[..., 1:]
        return logits, labels

    def sampled_loss(self, model: nn.Module, inputs: Mapping[str, Any],
                     generator: torch.Generator | None = None) -> SampledLoss:
        """The mean loss of ``model`` on ``inputs`` against labels sampled from its own output.

        ``model`` is the unwrapped model, ``inputs`` a micro-batch on its device. Override this
        for a model whose output is not a classification over ``logits`` (the count ``n`` must
        be the number of predictions the loss averages).
        """
        labels = inputs.get("labels", inputs.get("shift_labels"))
        if labels is None:
            raise ValueError("SophiaTrainer's Hessian refresh needs the batch's labels to know which "
                             "predictions the loss counts; override SophiaTrainer.sampled_loss for a "
                             "model trained without them")
        forward_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        config = getattr(model, "config", None)
        if (getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" not in forward_inputs
                and hasattr(model, "prepare_decoder_input_ids_from_labels")):
            forward_inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        outputs = model(**forward_inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        problem = getattr(config, "problem_type", None)
        if problem == "regression":
            return gaussian_sampled_loss(logits, generator)
        if problem == "multi_label_classification":
            return bernoulli_sampled_loss(logits, generator)
        logits, targets = self._targets(model, inputs, logits)
        return sampled_categorical(logits, targets, ignore_index=IGNORE_INDEX, generator=generator)

    def _rank(self) -> int:
        return dist.get_rank() if distributed_world() else 0

    def _device_of_params(self) -> torch.device:
        return next(p for g in self.sophia_optimizer.param_groups for p in g["params"]).device

    # -- SophiaG: after the optimizer step ------------------------------------------------
    def _after_optimizer_step(self) -> None:
        step = self.state.global_step
        if self.sophia != "sophiag" or not self.sophia_optimizer.hessian_due():
            return
        window, self._window, window_step = self._window, [], self._window_step
        if window_step != self.sophia_optimizer.steps or not window:
            raise RuntimeError(f"SophiaTrainer: optimizer step {step} is due a Hessian refresh but its "
                               "micro-batches were not seen by training_step (an override that does not "
                               "call super().training_step?)")
        self.hessian_refreshes.append((step, self.gnb_refresh(window, step)))

    def gnb_refresh(self, micro_batches: list[Mapping[str, Any]], step: int) -> int:
        """The Gauss-Newton-Bartlett refresh after optimizer step ``step`` on ``micro_batches`` (the inputs that
        step trained on), by the shared refresh (:mod:`sophia.hessian.refresh`); returns the global N."""
        model = self.accelerator.unwrap_model(self.model_wrapped)
        device, rank = self._device_of_params(), self._rank()
        was_training = model.training
        model.train()

        def one(micro: int, inputs: Mapping[str, Any]):
            def run() -> SampledLoss:
                generator = label_generator(device, self.args.seed, step, rank, micro)
                with self.compute_loss_context_manager():
                    return self.sampled_loss(model, self._prepare_inputs(inputs), generator)
            return run

        try:
            max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else None
            # the unwrapped model's own forward (the DDP wrapper's would run training_step's hooks): summed here
            return gnb_refresh_micro_batches(self.sophia_optimizer, [one(i, x) for i, x in enumerate(micro_batches)],
                                             max_grad_norm=max_norm, reduction=AllReduceSum())
        finally:
            model.train(was_training)


    # -- SophiaH: before the optimizer step -----------------------------------------------
    def _add_hutchinson_estimate(self, model: nn.Module, inputs: Mapping[str, Any], step: int) -> None:
        opt = self.sophia_optimizer
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        if self._estimate_step != step:
            self._estimates, self._estimate_step, self._estimate_micro = HutchinsonAverage(params), step, 0
        unwrapped = self.accelerator.unwrap_model(model)
        prepared = self._prepare_inputs(inputs)
        distributions = {g["distribution"] for g in opt.param_groups}
        if len(distributions) != 1:
            raise ValueError("SophiaTrainer: all SophiaH param groups must use the same probe distribution")
        _, targets = self._targets(unwrapped, prepared)
        weight = int(prediction_mask(targets, IGNORE_INDEX).sum()) if targets is not None else 1
        if weight == 0:
            return
        generator = opt.generator
        if generator is None:
            generator = label_generator(params[0].device, self.args.seed, step, self._rank(),
                                        micro=self._estimate_micro)
        self._estimate_micro += 1
        unwrapped.train()

        def loss_fn(_params):
            with self.compute_loss_context_manager(), _math_attention():
                return self.compute_loss(unwrapped, dict(prepared))

        self._estimates.add(hutchinson(loss_fn, params, distribution=distributions.pop(), generator=generator), weight)

    def _before_optimizer_step(self) -> None:
        if self.sophia != "sophiah" or self._estimate_step != self.state.global_step + 1:
            return
        average, self._estimates, self._estimate_step = self._estimates, None, -1
        estimates = average.result(AllReduceSum())  # every rank, one that predicted nothing too
        if estimates is not None:
            self.sophia_optimizer.update_hessian(estimates=dict(zip(average.params, estimates)))

    # -- logs ---------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.optimizer is not None:
            diagnostics = self.sophia_optimizer.diagnostics()
            logs = {**logs, "win_rate": diagnostics["win_rate"], "hessian_norm": diagnostics["hessian_norm"],
                    "hessian_updates": diagnostics["hessian_updates"]}
        if start_time is None:
            super().log(logs)
        else:
            super().log(logs, start_time)
