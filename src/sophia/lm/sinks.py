"""Sinks beside ``metrics.jsonl``: TensorBoard and Weights & Biases (``sophia train --log-to tensorboard,wandb``).

``metrics.jsonl`` stays the source of truth; a sink gets every event as it is written (rank 0 only) and shows the
numbers of the ``train`` and ``eval`` events under the names of :data:`TAGS`: those of the authors' script
(Liuhong99/Sophia, ``train_sophiag.py``) where it logs the same quantity (``train/loss``, ``val/loss``, ``lr``,
``mfu``, ``train/win_rate``, ``hessian_norm2``), the counters beside them (``tokens`` is the second x-axis series:
tokens against steps), one series per layer for the attention statistics. Values are metrics.jsonl's, unchanged
(``mfu`` is a fraction, not the authors' percent). The x-axis is the step.

A resumed run continues the same sinks: TensorBoard writes into the same ``DIR/tensorboard/``, purging what an
interrupted run logged after the checkpoint it resumes (``purge_step``: no step twice, none out of order); W&B
continues the run whose id ``DIR/wandb-run-id`` keeps (``resume="allow"``; W&B's offline mode ignores ``resume`` but
keeps the explicit id, and a later ``wandb sync`` joins them). Opening, writing and closing a sink is guarded by
:class:`sophia.lm.metrics.Metrics`: a failure is reported once and never stops training.

>>> scalars({"event": "eval", "step": 5, "val_loss": 2.5, "lr": 1e-3, "attn_max_logit": [3.0, 4.5], "tokens": 640})
{'val/loss': 2.5, 'lr': 0.001, 'attention/max_logit/layer_0': 3.0, 'attention/max_logit/layer_1': 4.5, 'tokens': 640}
>>> parse_log_to("tensorboard, wandb,tensorboard")
('tensorboard', 'wandb')
"""

from __future__ import annotations

import importlib.util
import json
import math
import secrets
import string
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sophia.fileio import atomic_write_text

if TYPE_CHECKING:
    from sophia.lm.config import TrainConfig
    from sophia.lm.metrics import Metrics

# --log-to's names and the modules each needs (the [track] extra of pyproject.toml)
LOG_TO = {"tensorboard": ("tensorboard",), "wandb": ("wandb",)}
TRACK_EXTRA = "track"
WANDB_RUN_ID = "wandb-run-id"  # DIR/wandb-run-id: the W&B run a resumed run continues
TENSORBOARD_DIR = "tensorboard"

# metrics.jsonl's field -> the series' name
TAGS = {
    "train_loss": "train/loss",            # the authors' names
    "val_loss": "val/loss",
    "lr": "lr",
    "mfu": "mfu",
    "win_rate": "train/win_rate",
    "hessian_norm": "hessian_norm2",       # the Euclidean norm (the authors' hessian_norm is the L1 norm)
    "grad_norm": "train/grad_norm",        # before clipping
    "skipped_steps": "train/skipped_steps",
    "tokens_per_s": "perf/tokens_per_s",
    "elapsed": "perf/training_seconds",
    "tokens": "tokens",
    "train_passes": "passes/train",
    "hessian_passes": "passes/hessian",
    "hessian_updates": "hessian/refreshes",
    "hessian_skipped": "hessian/skipped_refreshes",
}
PER_LAYER = {"attn_max_logit": "attention/max_logit", "attn_entropy": "attention/entropy"}
_SERIES_EVENTS = ("train", "eval")


def parse_log_to(text: str | None) -> tuple[str, ...]:
    """``--log-to``'s sinks in order, once each ("none" or "": none); a ValueError naming the choices otherwise."""
    names = [n.strip() for n in (text or "").split(",") if n.strip() not in ("", "none")]
    unknown = [n for n in names if n not in LOG_TO]
    if unknown:
        raise ValueError(f"--log-to takes a comma list of {' and '.join(LOG_TO)} (or none), got {unknown[0]!r}")
    return tuple(dict.fromkeys(names))


def missing_packages(names: tuple[str, ...]) -> str | None:
    """One line naming the packages the sinks ``names`` need that are not installed, and how to install them."""
    missing = [m for n in names for m in LOG_TO[n] if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"--log-to {','.join(names)} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed: pip install 'sophia-lab[{TRACK_EXTRA}]'")


def scalars(event: dict[str, Any]) -> dict[str, float]:
    """The series values an event gives (``train`` and ``eval`` events; none for the others), by series name."""
    if event.get("event") not in _SERIES_EVENTS:
        return {}
    out: dict[str, float] = {}
    for key, value in event.items():
        if key in TAGS and _is_number(value):
            out[TAGS[key]] = value
        elif key in PER_LAYER and isinstance(value, list):
            out.update({f"{PER_LAYER[key]}/layer_{i}": v for i, v in enumerate(value) if _is_number(v)})
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _hparams(cfg: TrainConfig) -> dict[str, bool | int | float | str]:
    """The resolved config as hyper-parameters (None, which TensorBoard cannot show, as "None")."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in cfg.to_dict().items()}


class TensorBoardSink:
    """Event files in ``DIR/tensorboard/``: every series once per step, in step order, and the config (the HPARAMS
    tab and a ``config`` text). ``step``: the step a resumed run continues from (what was logged after it is
    purged); a new run purges everything an earlier run left in the folder."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, *, step: int, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(out_dir) / TENSORBOARD_DIR
        first = not any(folder.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=step + 1 if resumed else 0, flush_secs=10)
        self._last: dict[str, int] = {}  # series -> the last step written (eval and train events share a step)
        if first or not resumed:
            self._config(cfg)

    def _config(self, cfg: TrainConfig) -> None:
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(_hparams(cfg), {"val/loss": math.nan}):  # links HPARAMS to the val/loss series
            self.writer.file_writer.add_summary(summary)
        text = "\n".join(f"    {k}: {json.dumps(v)}" for k, v in cfg.to_dict().items())  # markdown code block
        self.writer.add_text("config", text, 0)

    def write(self, event: dict[str, Any]) -> None:
        step = event["step"]
        for tag, value in scalars(event).items():
            if self._last.get(tag, -1) < step:
                self.writer.add_scalar(tag, value, step)
                self._last[tag] = step
        if event.get("event") == "eval":  # seen within seconds, not at the writer's next flush
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run in ``DIR/wandb/`` (project ``--wandb-project``, name ``--run-name`` or the out-dir's name, group
    ``--run-group``), the config as its hyper-parameters, the ``summary`` event as its summary. Its id is kept in
    ``DIR/wandb-run-id``, so that a resumed run continues it."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, *, step: int, resumed: bool) -> None:
        import wandb

        out_dir = Path(out_dir)
        id_file = out_dir / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
        if not run_id:  # a new run (one without a checkpoint starts a new W&B run too)
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B's
            atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=cfg.wandb_project, name=cfg.run_name or out_dir.resolve().name,
                              group=cfg.run_group, id=run_id, resume="allow", dir=str(out_dir),
                              config=cfg.to_dict(), settings=wandb.Settings(console="off", quiet=True))
        # W&B's steps only increase: an online run resumed from an earlier checkpoint already holds the steps before
        # run.step (with the same values, bitwise on CPU); logging them again would be refused, a warning each
        self._first_step = self.run.step

    def write(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "summary":
            self.run.summary.update({k: v for k, v in event.items() if _is_number(v) or k in PER_LAYER})
            return
        if kind == "start":
            self.run.config.update({k: event[k] for k in ("parameters", "world_size", "device", "flops_per_token",
                                                          "peak_tflops") if k in event}, allow_val_change=True)
        values = scalars(event)
        if values and event["step"] >= self._first_step:
            self.run.log(values, step=event["step"])

    def close(self) -> None:
        self.run.finish()


SINKS: dict[str, Callable[..., Any]] = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


def attach_sinks(metrics: Metrics, cfg: TrainConfig, *, resumed: bool) -> None:
    """Open ``--log-to``'s sinks into ``metrics`` (rank 0's), at the step the run starts from."""
    step = metrics.counters["step"]
    for name in parse_log_to(cfg.log_to):
        metrics.add_sink(name, lambda name=name: SINKS[name](cfg, metrics.out_dir, step=step, resumed=resumed))


__all__ = ["LOG_TO", "PER_LAYER", "SINKS", "TAGS", "TensorBoardSink", "WandbSink", "attach_sinks",
           "missing_packages", "parse_log_to", "scalars"]
