"""The typed configuration of a training run: a preset, the optimizer's settings, overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from sophia.lm.optimizers import OPTIMIZERS
from sophia.lm.presets import get_preset


class TrainError(Exception):
    """A problem with the user's input: reported as one line, exit status 1."""


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
    compile: bool = False
    progress: bool = True
    flush_denormal: bool = True  # CPU only: subnormal floats to zero (restored after the run)
    attn_logit_warn: float = 300.0  # warn once when an attention logit exceeds this (0: never)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps if self.lr_decay_steps is not None else self.max_steps

    def validate(self) -> None:
        positive = ("block_size", "n_layer", "n_head", "n_embd", "batch_size", "grad_accum", "max_steps",
                    "eval_every", "eval_batches", "checkpoint_every", "log_every", "hessian_interval")
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
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps > 0):
            raise TrainError(f"--eps must be a finite number > 0, got {self.eps!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise TrainError(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")


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
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


# Settings a resumed run may change without breaking its exactness (or, for max_steps, knowingly:
# with lr_decay_steps unset the cosine schedule follows the new length).
RESUME_CHANGEABLE = {"max_steps", "eval_every", "checkpoint_every", "log_every", "progress", "device", "data_root",
                     "flush_denormal", "attn_logit_warn"}


def resume_config(saved: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The saved run's settings, with the explicitly given ones that a resume may change."""
    values = {k: v for k, v in saved.items() if k in FIELD_NAMES}
    for key, value in (overrides or {}).items():
        if key not in FIELD_NAMES:
            raise TrainError(f"unknown setting {key!r}")
        if value is None or value == values.get(key):
            continue
        if key not in RESUME_CHANGEABLE:
            flag = "--" + key.replace("_", "-")
            raise TrainError(f"--resume continues the saved settings: {flag} was {values.get(key)!r}, not "
                             f"{value!r}; start a new run (another --out-dir) to change it")
        values[key] = value
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
