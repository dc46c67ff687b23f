"""Atomic checkpoints and the run's metrics log."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from sophia.lm.config import TrainError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def atomic_write_bytes(path: Path, writer) -> None:
    """Write through ``writer(file)`` into a temporary file beside ``path``, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(out_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(out_dir / CHECKPOINT, lambda f: torch.save(state, f))


def load_checkpoint(out_dir: Path, purpose: str = "--resume") -> dict[str, Any]:
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        raise TrainError(f"{purpose}: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise TrainError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {first}); "
                         "it was left untouched") from None
    missing = {"model", "step", "optimizer", "config", "rng"} - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise TrainError(f"checkpoint {path} lacks {sorted(missing)}: not written by sophia train")
    return ckpt


class MetricsLog:
    """DIR/metrics.jsonl: one JSON object per event, appended and flushed line by line."""

    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.path = out_dir / METRICS
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop events of steps after ``step`` (those a resumed run will redo)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if event.get("step", 0) <= step:
                kept.append(line)
        text = "".join(k + "\n" for k in kept)
        atomic_write_bytes(self.path, lambda f: f.write(text.encode()))

    def write(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / METRICS
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return events
