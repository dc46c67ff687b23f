"""Atomic, rotated checkpoints and the run's metrics log.

A run directory holds ``checkpoint-STEP.pt`` files (STEP zero-padded to 8 digits), the newest
``keep`` of them; each is written to a temporary file, fsynced, renamed into place and the
directory fsynced, so a kill at any moment leaves every earlier checkpoint whole. Loading picks
the newest one that reads; a damaged newest one is reported and the next older one is used.
``checkpoint.pt``, the single file earlier versions wrote, is still read (as the oldest).

Under ``--parallel fsdp`` a checkpoint is a folder ``checkpoint-STEP.dcp`` written by
``torch.distributed.checkpoint``: every rank writes its own shards of the weights and optimizer
state (no gather onto one rank), and rank 0 adds ``meta.pt`` (settings, counters, every rank's RNG
state). All of it goes into ``.checkpoint-STEP.dcp.tmp`` first; only when DCP's metadata and
``meta.pt`` are both written (and fsynced) is the folder renamed into place, so a folder with the
final name is always whole, and a save cut short leaves only a hidden temporary folder, which is
never read and is removed at the next start.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from sophia.lm.config import TrainError
from sophia.lm.data import fsync_dir

CHECKPOINT = "checkpoint.pt"  # the name earlier versions used (read, never written)
METRICS = "metrics.jsonl"
TOKENIZER_DIR = "tokenizer"  # what `sophia sample` needs to decode, kept in the run folder
_NUMBERED = re.compile(r"checkpoint-(\d{8})\.(pt|dcp)")
SHARDED_META = "meta.pt"  # in a .dcp folder: everything but the tensors DCP holds


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step:08d}.pt"


def sharded_checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step:08d}.dcp"


def _step_of(p: Path) -> tuple[int, str]:
    m = _NUMBERED.fullmatch(p.name)
    return (int(m.group(1)), p.name) if m else (-1, p.name)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """The run's checkpoints, newest first (step-numbered files and DCP folders by step, then the legacy file)."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    numbered = sorted((p for p in d.iterdir() if _NUMBERED.fullmatch(p.name)), key=_step_of, reverse=True)
    legacy = [d / CHECKPOINT] if (d / CHECKPOINT).is_file() else []
    return numbered + legacy


def has_checkpoint(out_dir: Path) -> bool:
    return bool(list_checkpoints(out_dir))


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
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    """A checkpoint file, or a folder: renamed to a hidden name first, so a half-deleted one is never read."""
    import shutil

    if path.is_dir():
        hidden = path.with_name(f".{path.name}.old.tmp")
        shutil.rmtree(hidden, ignore_errors=True)
        os.replace(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _rotate(out_dir: Path, keep: int) -> None:
    numbered = [p for p in list_checkpoints(out_dir) if _NUMBERED.fullmatch(p.name)]
    for old in numbered[max(1, keep):]:
        _remove(old)


def remove_stale(out_dir: Path) -> None:
    """Temporary files and folders that a kill during a save left behind (never read as checkpoints)."""
    import shutil

    for stale in Path(out_dir).glob(".checkpoint*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def save_sharded_checkpoint(out_dir: Path, state: dict[str, Any], info: dict[str, Any], *, main: bool,
                            keep: int = 2) -> Path:
    """Write ``checkpoint-STEP.dcp`` with torch.distributed.checkpoint: every rank writes its shards of
    ``state`` (a collective: all ranks call it), rank 0 adds ``info`` as meta.pt, then renames the finished
    folder into place and rotates (``keep`` newest)."""
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    final = sharded_checkpoint_path(out_dir, int(info["step"]))
    tmp = final.with_name(f".{final.name}.tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))  # returns on every rank once the metadata is written
    if main:
        try:
            atomic_write_bytes(tmp / SHARDED_META, lambda f: torch.save(info, f))
            fsync_dir(tmp)
            if final.exists():
                _remove(final)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as e:
            raise TrainError(f"cannot write the checkpoint {final}: {e.strerror or e} (the earlier checkpoints "
                             "are intact)") from None
        _rotate(out_dir, keep)
    dist.barrier()  # nobody reads or writes the run folder before the checkpoint is in place
    return final


def save_checkpoint(out_dir: Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``checkpoint-STEP.pt`` atomically, then remove the step-numbered ones beyond the newest ``keep``."""
    path = checkpoint_path(out_dir, int(state["step"]))
    try:
        atomic_write_bytes(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise TrainError(f"cannot write the checkpoint {path}: {e.strerror or e} (the earlier checkpoints are "
                         "intact)") from None
    _rotate(out_dir, keep)
    return path


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return _read_sharded_meta(path)
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


def _read_sharded_meta(path: Path) -> dict[str, Any]:
    """A DCP checkpoint folder's meta.pt (the tensors are read by :func:`load_sharded_model` or the trainer)."""
    if not (path / ".metadata").is_file() or not (path / SHARDED_META).is_file():
        raise TrainError(f"checkpoint {path} is incomplete (no .metadata or {SHARDED_META}); it was left untouched")
    try:
        ckpt = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise TrainError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {first}); "
                         "it was left untouched") from None
    missing = {"step", "config", "rng", "model_config"} - set(ckpt) if isinstance(ckpt, dict) else {"step"}
    if missing:
        raise TrainError(f"checkpoint {path} lacks {sorted(missing)}: not written by sophia train")
    ckpt["format"] = "dcp"
    return ckpt


def load_sharded_model(path: Path, model: torch.nn.Module) -> None:
    """The weights of a DCP checkpoint folder into an unsharded ``model``, in this one process (no process
    group needed): DCP assembles the shards every rank wrote."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
        except Exception as e:  # noqa: BLE001 - a damaged shard file
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise TrainError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {first})") from None
    model.load_state_dict(state["model"])


def load_checkpoint(out_dir: Path, purpose: str = "--resume", log=None) -> dict[str, Any]:
    """The newest readable checkpoint of ``out_dir``, with its file under the key ``"path"``.

    Damaged newer ones are skipped (and reported through ``log``); when none reads, the error names
    the newest."""
    paths = list_checkpoints(out_dir)
    if not paths:
        raise TrainError(f"{purpose}: no checkpoint in {out_dir}")
    first_error: TrainError | None = None
    for path in paths:
        try:
            ckpt = _read_checkpoint(path)
        except TrainError as e:
            first_error = first_error or e
            if log is not None:
                log(f"warning: {e}; trying an older one")
            continue
        ckpt["path"] = str(path)
        return ckpt
    assert first_error is not None
    raise first_error


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


def keep_tokenizer(out_dir: Path, dataset_dir: Path) -> None:
    """Copy the files that define the dataset's tokenizer (meta.json and a trained BPE's tokenizer.json, or
    nanoGPT's meta.pkl) into ``out_dir/tokenizer``, so sampling needs no dataset."""
    import shutil

    target = Path(out_dir) / TOKENIZER_DIR
    if target.is_dir():
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{TOKENIZER_DIR}.", dir=out_dir))
    try:
        for name in ("meta.json", "tokenizer.json", "meta.pkl"):
            if (Path(dataset_dir) / name).is_file():
                shutil.copy2(Path(dataset_dir) / name, tmp / name)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
