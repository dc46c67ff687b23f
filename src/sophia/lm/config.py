"""The typed configuration of a training run: a preset, the optimizer's settings, overrides."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sophia.lm.muon import MUON_NS_DTYPES
from sophia.lm.optimizers import NEEDS_CREATE_GRAPH, OPTIMIZERS
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


@dataclass
class TrainConfig:
    preset: str = "tiny"
    optimizer: str = "sophiag"
    out_dir: str = "runs/tiny-sophiag"
    data_root: str = "data"
    corpus: str = "shakespeare"
    tokenizer: str = "byte"
    # model
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    qk_norm: bool = False  # RMSNorm of q and k per head (not in the paper's GPT-2)
    vocab_pad_multiple: int = 64  # embedding/head rows padded to a multiple (padded ids never scored)
    # batch and schedule
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 1000
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # None: max_steps
    # optimizer
    lr: float = 2e-3
    min_lr: float = 2e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    rho: float = 0.05
    eps: float | None = None
    muon_lr: float | None = None  # Muon's hidden matrices (--lr is its AdamW part's); None: the preset's
    muon_ns_dtype: str = "bfloat16"  # Muon's Newton-Schulz iteration: bfloat16 (torch's) or float32
    grad_clip: float = 1.0  # 0 disables
    hessian_interval: int = 10
    hessian_batch_fraction: float = 1.0
    # bookkeeping
    eval_every: int = 100
    eval_batches: int = 20
    checkpoint_every: int = 250
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto | float32 | bfloat16 (autocast)
    compile: bool | None = None  # None: on for CUDA, off for CPU
    progress: bool = True
    flush_denormal: bool = True  # CPU only: subnormal floats to zero (restored after the run)
    attn_logit_warn: float = 300.0  # warn once when an attention logit exceeds this (0: never)
    tf32: bool = True  # CUDA only: TensorFloat-32 for fp32 matmuls (restored after the run)
    fused_optimizer: bool = True  # CUDA only: fused AdamW, SophiaG's CUDA-graph path
    memory_check: bool = True
    device_memory_gib: float | None = None  # None: the device's own
    peak_tflops: float | None = None  # for MFU; None: from the table of known GPUs
    max_skipped_steps: int = 10  # consecutive steps with a non-finite gradient before the run stops
    keep_checkpoints: int = 2
    dist_timeout_min: float = 30.0  # torch.distributed collective timeout
    parallel: str = "ddp"  # ddp (every rank holds everything) | fsdp (FSDP2: weights, grads, state sharded)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward

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
        if self.muon_ns_dtype not in MUON_NS_DTYPES:
            raise TrainError(f"--muon-ns-dtype must be {' or '.join(MUON_NS_DTYPES)}, got {self.muon_ns_dtype!r}")
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps > 0):
            raise TrainError(f"--eps must be a finite number > 0, got {self.eps!r}")
        for name in ("device_memory_gib", "peak_tflops", "dist_timeout_min"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise TrainError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise TrainError(f"--parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.parallel == "fsdp" and self.optimizer in ("adahessian", "muon"):
            why = ("needs backward(create_graph=True) through the sharded weights, which FSDP2 does not support"
                   if self.optimizer == "adahessian" else "orthogonalises whole matrices, which FSDP2 shards")
            raise TrainError(f"--parallel fsdp does not support --optimizer {self.optimizer}: it {why}; use "
                             "--parallel ddp")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise TrainError(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.compile and self.optimizer in NEEDS_CREATE_GRAPH:  # None (the default) just skips compiling
            raise TrainError(f"--compile does not support the double backward that {self.optimizer} needs")


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


# Settings a resumed run may change. Those above the line leave the run exact; the schedule ones
# (lr, min_lr, max_steps, lr_decay_steps) change the run knowingly and are recorded in metrics.jsonl.
RESUME_CHANGEABLE = {"eval_every", "checkpoint_every", "log_every", "progress", "device", "data_root",
                     "flush_denormal", "attn_logit_warn", "compile", "tf32", "fused_optimizer", "memory_check",
                     "device_memory_gib", "peak_tflops", "max_skipped_steps", "keep_checkpoints", "dist_timeout_min",
                     "activation_checkpointing",
                     # --- these change what is trained:
                     "max_steps", "lr", "min_lr", "lr_decay_steps"}
SCHEDULE_CHANGES = ("max_steps", "lr", "min_lr", "lr_decay_steps")
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
