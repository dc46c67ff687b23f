"""The typed configuration of a training run: a preset, the optimizer's settings, overrides."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from sophia.lm.muon import MUON_NS_DTYPES
from sophia.lm.optimizers import OPTIMIZERS, REGISTRY
from sophia.lm.presets import get_preset


class TrainError(Exception):
    """A problem with the user's input: reported as one line, exit status 1."""


def check_writable_dir(path: str | os.PathLike[str], flag: str) -> None:
    """``path`` is, or can be made, a directory this process may write into (checked before any work, creating
    nothing); a TrainError naming ``flag`` and the file or folder in the way otherwise."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise TrainError(f"{flag} {path}: {folder} is a file, not a directory")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise TrainError(f"{flag} {path}: {folder} is not writable")
            return


_SOPHIA = ("sophiag", "sophiah")  # the optimizers with rho and a Hessian estimate of the batch


def setting(default: Any, help: str = "", *, choices: tuple[str, ...] | None = None,
            resumable: bool | Literal["schedule"] = False, used_by: tuple[str, ...] | None = None,
            own_option: bool = False, comma_list: bool = False) -> Any:
    """A :class:`TrainConfig` field with everything ``sophia train`` says and checks about it, in one place.

    ``help``: the option's help text (the default is appended). ``choices``: the values it takes (checked by
    :meth:`TrainConfig.validate`, "--flag must be a, b or c"); with ``comma_list``, a comma list of them ("--flag
    must be a comma list of a, b or c"). ``resumable``: whether ``--resume`` may change it:
    True for settings that leave the run exact (bookkeeping, speed), ``"schedule"`` for those that change what is
    trained (recorded in metrics.jsonl). ``used_by``: the optimizers that read it (None: all); given explicitly
    to another, it is said to have no effect. ``own_option``: ``sophia train`` has its own option for it rather
    than an override of the preset.

    >>> [f.metadata["used_by"] for f in dataclasses.fields(TrainConfig) if f.name == "rho"]
    [('sophiag', 'sophiah')]
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "resumable": resumable,
                                                        "used_by": used_by, "own_option": own_option,
                                                        "comma_list": comma_list})


@dataclass
class TrainConfig:
    """The settings of a training run. Each is a :func:`setting`: its ``sophia train`` option, help text, choices,
    whether a resume may change it and which optimizers read it are all derived from the field."""

    preset: str = setting("tiny", own_option=True)
    optimizer: str = setting("sophiag", own_option=True)
    out_dir: str = setting("runs/tiny-sophiag", own_option=True)
    data_root: str = setting("data", "where prepared datasets live", resumable=True)
    corpus: str = setting("shakespeare", "shakespeare, openwebtext, a text file or folder, or a prepared (or "
                                         "nanoGPT) data directory")
    tokenizer: str = setting("byte", "byte, gpt2 or bpe:N")
    # model
    block_size: int = setting(128)
    n_layer: int = setting(4)
    n_head: int = setting(4)
    n_embd: int = setting(128)
    dropout: float = setting(0.0)
    bias: bool = setting(True)
    qk_norm: bool = setting(False, "RMSNorm of queries and keys per head")  # not in the paper's GPT-2
    vocab_pad_multiple: int = setting(64, "pad the embedding/head rows to a multiple (padded ids are never scored)")
    # batch and schedule
    batch_size: int = setting(32, "sequences per micro-batch")
    grad_accum: int = setting(1, "micro-batches per step over all ranks")
    max_steps: int = setting(1000, resumable="schedule")
    warmup_steps: int = setting(100)
    lr_decay_steps: int | None = setting(None, "end of the cosine decay (None: --max-steps)", resumable="schedule")
    # optimizer
    lr: float = setting(2e-3, resumable="schedule")
    min_lr: float = setting(2e-4, resumable="schedule")
    weight_decay: float = setting(0.1)
    beta1: float = setting(0.9)
    beta2: float = setting(0.95)
    rho: float = setting(0.05, "Sophia's clipping threshold", used_by=_SOPHIA)
    eps: float | None = setting(None)  # None: the optimizer's own default
    muon_lr: float | None = setting(None, "muon: the lr of the hidden matrices (--lr is the AdamW part's: "
                                          "embeddings, norms, biases)", used_by=("muon",))  # None: the preset's
    muon_ns_dtype: str = setting("bfloat16", "muon: the Newton-Schulz iteration's dtype, bfloat16 (torch's) or "
                                             "float32 (faster on a CPU without native bfloat16 matmuls, e.g. AVX2 "
                                             "only)", choices=MUON_NS_DTYPES, used_by=("muon",))
    grad_clip: float = setting(1.0)  # 0 disables
    hessian_interval: int = setting(10, "k: steps between Hessian refreshes (Sophia, AdaHessian)",
                                    used_by=(*_SOPHIA, "adahessian"))
    hessian_batch_fraction: float = setting(1.0, "fraction of the batch used for the Hessian estimate",
                                            used_by=_SOPHIA)
    # bookkeeping
    eval_every: int = setting(100, resumable=True)
    eval_batches: int = setting(20)
    checkpoint_every: int = setting(250, resumable=True)
    log_every: int = setting(10, resumable=True)
    seed: int = setting(0)
    device: str = setting("auto", "auto, cpu or cuda[:N]", resumable=True)
    dtype: str = setting("auto", "auto (bf16 autocast on CUDA), float32 or bfloat16",
                         choices=("auto", "float32", "bfloat16"))
    compile: bool | None = setting(None, "torch.compile the model (default on CUDA)", resumable=True)
    progress: bool = setting(True, resumable=True)
    flush_denormal: bool = setting(True, "CPU: flush subnormal floats to zero during the run",
                                   resumable=True)  # restored after the run
    attn_logit_warn: float = setting(300.0, "warn when an attention logit passes this (0: never)", resumable=True)
    tf32: bool = setting(True, "CUDA: TF32 matmuls for fp32", resumable=True)  # restored after the run
    fused_optimizer: bool = setting(True, "CUDA: fused AdamW, SophiaG's CUDA-graph step", resumable=True)
    memory_check: bool = setting(True, "refuse a run whose estimated memory does not fit the device",
                                 resumable=True)
    device_memory_gib: float | None = setting(None, "the device memory to plan for (default: the device's)",
                                              resumable=True)
    peak_tflops: float | None = setting(None, "the device's peak for MFU (default: a table of known GPUs)",
                                        resumable=True)
    max_skipped_steps: int = setting(10, "consecutive non-finite-gradient steps before the run stops",
                                     resumable=True)
    keep_checkpoints: int = setting(2, "step-numbered checkpoints kept", resumable=True)
    dist_timeout_min: float = setting(30.0, "collective timeout in minutes", resumable=True)
    parallel: str = setting("ddp", "ddp (each rank holds the whole model) or fsdp (FSDP2: weights, gradients and "
                                   "optimizer state sharded over the ranks; sharded checkpoints)",
                            choices=("ddp", "fsdp"))
    activation_checkpointing: bool = setting(False, "recompute each block's activations in the backward (less "
                                                    "memory, ~1/3 more compute)", resumable=True)
    # tracking (sophia.lm.sinks): where else the events of metrics.jsonl go; a resume may change it all
    log_to: str = setting("none", "also log to a comma list of tensorboard (DIR/tensorboard/) and wandb (DIR/wandb/; "
                              "WANDB_MODE=offline works without network), or none; metrics.jsonl is always "
                              "written", choices=("none", "tensorboard", "wandb"), comma_list=True, resumable=True)
    wandb_project: str = setting("sophia-lab", "the W&B project (--log-to wandb)", resumable=True)
    run_name: str | None = setting(None, "the run's name in W&B; None: the --out-dir's name", resumable=True)
    run_group: str | None = setting(None, "the run's W&B group; bench converge gives its sweep's folder name",
                                    resumable=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps if self.lr_decay_steps is not None else self.max_steps

    def validate(self) -> None:
        positive = ("block_size", "n_layer", "n_head", "n_embd", "batch_size", "grad_accum", "max_steps",
                    "eval_every", "eval_batches", "checkpoint_every", "log_every", "hessian_interval",
                    "vocab_pad_multiple", "max_skipped_steps", "keep_checkpoints")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.warmup_steps < 0:
            raise TrainError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise TrainError(f"--lr-decay-steps must be >= 1, got {self.lr_decay_steps}")
        if self.n_embd % self.n_head:
            raise TrainError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")
        for name in ("lr", "min_lr", "weight_decay", "rho", "grad_clip", "attn_logit_warn"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise TrainError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise TrainError(f"--lr must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise TrainError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise TrainError(f"--{name} must be in [0, 1), got {v!r}")
        if not 0.0 < self.hessian_batch_fraction <= 1.0:
            raise TrainError(f"--hessian-batch-fraction must be in (0, 1], got {self.hessian_batch_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.muon_lr is not None and not (math.isfinite(self.muon_lr) and self.muon_lr > 0):
            raise TrainError(f"--muon-lr must be a finite number > 0, got {self.muon_lr!r}")
        for f in fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            given = value.split(",") if f.metadata["comma_list"] and isinstance(value, str) else [value]
            if choices and any(v not in choices for v in given):
                kind = "a comma list of " if f.metadata["comma_list"] else ""
                raise TrainError(f"{flag(f.name)} must be {kind}{_one_of(choices)}, got {value!r}")
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps > 0):
            raise TrainError(f"--eps must be a finite number > 0, got {self.eps!r}")
        for name in ("device_memory_gib", "peak_tflops", "dist_timeout_min"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise TrainError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v!r}")
        self._check_log_to()
        entry = REGISTRY[self.optimizer]
        if self.parallel == "fsdp" and entry.fsdp_refusal is not None:
            raise TrainError(f"--parallel fsdp does not support --optimizer {self.optimizer}: it {entry.fsdp_refusal}; "
                             "use --parallel ddp")
        if self.compile and entry.second_order_graph:  # None (the default) just skips compiling
            raise TrainError(f"--compile does not support the double backward that {self.optimizer} needs")

    def _check_log_to(self) -> None:
        """--log-to's sinks have their packages installed (checked with the settings: before any work)."""
        from sophia.lm.sinks import missing_packages, parse_log_to

        names = parse_log_to(self.log_to)
        missing = missing_packages(names)
        if missing is not None:
            raise TrainError(missing)
        if "wandb" in names and not self.wandb_project.strip():
            raise TrainError("--wandb-project must not be empty")


def check_world_size(cfg: TrainConfig, world_size: int, saved_world_size: int | None = None) -> None:
    """The settings that depend on the number of ranks, checked alike for ``--dry-run``'s plan and the run: a
    TrainError unless ``world_size`` ranks can train ``cfg`` (and continue a checkpoint written by
    ``saved_world_size`` ranks, when resuming)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise TrainError(f"--world-size must be a positive integer, got {world_size!r}")
    if cfg.grad_accum >= world_size and cfg.grad_accum % world_size:
        raise TrainError(f"--grad-accum ({cfg.grad_accum}) counts micro-batches over all ranks and must be "
                         f"divisible by the number of ranks ({world_size})")
    if (saved_world_size is not None and saved_world_size != world_size
            and cfg.grad_accum < max(world_size, saved_world_size)):
        raise TrainError(f"--resume: the checkpoint was written by {saved_world_size} rank(s), not {world_size}, "
                         f"and --grad-accum {cfg.grad_accum} is below one of them, so the global batch would "
                         "change; resume on the same number of ranks")


FIELD_NAMES = {f.name for f in fields(TrainConfig)}
# Settings a resumed run may change: those marked resumable=True leave the run exact; the schedule ones change
# the run knowingly and are recorded in metrics.jsonl.
RESUME_CHANGEABLE = {f.name for f in fields(TrainConfig) if f.metadata["resumable"]}
SCHEDULE_CHANGES = tuple(f.name for f in fields(TrainConfig) if f.metadata["resumable"] == "schedule")
# Settings only some optimizers read; given explicitly to another, they are said to do nothing.
USED_BY = {f.name: f.metadata["used_by"] for f in fields(TrainConfig) if f.metadata["used_by"] is not None}


def flag(name: str) -> str:
    """The ``sophia train`` option of the setting ``name``: ``--max-steps`` for ``max_steps``."""
    return "--" + name.replace("_", "-")


def _one_of(choices: tuple[str, ...]) -> str:
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


def unused_settings(optimizer: str, overrides: dict[str, Any]) -> list[str]:
    """The settings given in ``overrides`` (not None) that ``optimizer`` does not read."""
    return [k for k, users in USED_BY.items() if overrides.get(k) is not None and optimizer not in users]


def to_argv(settings: dict[str, Any]) -> list[str]:
    """The ``sophia train`` options that give ``settings`` (``{name: value}``, a TrainConfig's fields, e.g.
    ``cfg.to_dict()`` or a dict of overrides); None means "not given" (the preset's value) and is left out. Options
    come in the fields' order; a bool is ``--flag`` or ``--no-flag``.

    >>> to_argv({"lr": 0.001, "qk_norm": True, "compile": False, "eps": None, "optimizer": "adamw"})
    ['--optimizer', 'adamw', '--qk-norm', '--lr', '0.001', '--no-compile']
    """
    unknown = set(settings) - FIELD_NAMES
    if unknown:
        raise TrainError(f"unknown setting {sorted(unknown)[0]!r}")
    argv: list[str] = []
    for f in fields(TrainConfig):
        value = settings.get(f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
            continue
        text = repr(value) if isinstance(value, float) else str(value)
        # a value that starts with "-" and is not a number would be read as an option: give it with "="
        argv += [f"{flag(f.name)}={text}"] if text.startswith("-") and not _is_number(text) else [flag(f.name), text]
    return argv


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def resolve_config(preset: str, optimizer: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Preset values, then the preset's settings for ``optimizer``, then explicit overrides."""
    try:
        values = get_preset(preset)
    except ValueError as e:
        raise TrainError(str(e)) from None
    per_opt = values.pop("optimizers")
    if optimizer not in per_opt:
        raise TrainError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    values.update(per_opt[optimizer])
    values.update(preset=preset, optimizer=optimizer, out_dir=f"runs/{preset}-{optimizer}")
    for key, value in (overrides or {}).items():
        if key not in FIELD_NAMES:
            raise TrainError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = value
    own = _corpus_tokenizer(values["corpus"], (overrides or {}).get("tokenizer"), values["tokenizer"])
    if own is not None:  # a prepared folder is read with its own tokenizer: record that one
        values["tokenizer"] = own
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def _corpus_tokenizer(corpus: str, asked: str | None, tokenizer: str) -> str | None:
    """A prepared dataset folder's own tokenizer (refusing an ``asked`` one that differs); for another corpus, None
    after the checks the run's data preparation makes first (so that --dry-run refuses what the run refuses)."""
    from sophia.lm.data import DataError, check_corpus, folder_tokenizer

    try:
        own = folder_tokenizer(corpus, asked)
        if own is None:
            check_corpus(corpus, tokenizer)
        return own
    except (DataError, ValueError) as e:
        raise TrainError(str(e)) from None


# Defaults for settings that did not exist when an older checkpoint was written (its behaviour then).
LEGACY_DEFAULTS = {"vocab_pad_multiple": 1, "qk_norm": False, "parallel": "ddp"}


def resume_config(saved: dict[str, Any], overrides: dict[str, Any] | None = None,
                  changes: dict[str, tuple[Any, Any]] | None = None, *,
                  refusal: str = "--resume continues the saved settings") -> TrainConfig:
    """The saved run's settings, with the explicitly given ones that a resume may change.

    An explicit setting that differs from the saved one and may not change is refused, with a TrainError that
    starts with ``refusal`` and names the setting, its saved value and the requested one.
    ``changes`` (if given) receives ``{setting: (saved, new)}`` for every schedule setting that differs.
    A new ``--max-steps`` keeps the saved cosine schedule's length unless ``--lr-decay-steps`` is given
    too: a run extended from 1000 to 2000 steps continues at min_lr rather than jumping back up."""
    values = {**LEGACY_DEFAULTS, **{k: v for k, v in saved.items() if k in FIELD_NAMES}}
    overrides = dict(overrides or {})
    if (overrides.get("max_steps") not in (None, values.get("max_steps")) and overrides.get("lr_decay_steps") is None
            and values.get("lr_decay_steps") is None):
        overrides["lr_decay_steps"] = values["max_steps"]  # keep the schedule's length
    for key, value in overrides.items():
        if key not in FIELD_NAMES:
            raise TrainError(f"unknown setting {key!r}")
        if value is None or value == values.get(key):
            continue
        if key not in RESUME_CHANGEABLE:
            flag = "--" + key.replace("_", "-")
            raise TrainError(f"{refusal}: {flag} was {values.get(key)!r}, not {value!r}; start a new run "
                             "(another --out-dir) to change it")
        if changes is not None and key in SCHEDULE_CHANGES:
            changes[key] = (values.get(key), value)
        values[key] = value
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
