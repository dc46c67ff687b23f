"""Atomic, rotated checkpoints, and the run folder's copy of its tokenizer.

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

A checkpoint that does not read (torn, cut, not written by ``sophia train``) never counts toward
``keep``: rotation keeps the newest ``keep`` that read and moves a damaged one aside, to
``NAME.damaged`` (never read, never deleted, never overwritten by a later save of the same step),
with a warning. A resumed run does the same with the damaged ones newer than its checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sophia.fileio import atomic_write_bytes, fsync_dir
from sophia.lm.config import TrainError
from sophia.lm.metrics import METRICS

CHECKPOINT = "checkpoint.pt"  # the name earlier versions used (read, never written)
TOKENIZER_DIR = "tokenizer"  # what `sophia sample` needs to decode, kept in the run folder
_NUMBERED = re.compile(r"checkpoint-(\d{8})\.(pt|dcp)")
SHARDED_META = "meta.pt"  # in a .dcp folder: everything but the tensors DCP holds
DAMAGED_SUFFIX = ".damaged"  # a checkpoint that does not read, moved aside: never read, counted or deleted

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class DamagedCheckpointError(TrainError):
    """A checkpoint that cannot be read; ``reason`` says why (e.g. "is corrupt or unreadable (...)")."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"checkpoint {path} {reason}; it was left untouched")


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


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``NAME.damaged`` (``.damaged.1``, ... if taken), so that it is never read,
    counted or overwritten, and nothing of it is lost; the new path."""
    path = Path(path)
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    n = 0
    while target.exists() or target.is_symlink():
        n += 1
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{n}")
    os.rename(path, target)
    fsync_dir(path.parent)
    return target


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable checkpoint ("is corrupt or unreadable (...)"), or None when it reads."""
    try:
        _read_checkpoint(path)
    except DamagedCheckpointError as e:
        return e.reason
    return None


def _rotate(out_dir: Path, keep: int, written: Path, log: Log | None = _stderr) -> None:
    """Keep the newest ``keep`` checkpoints that read (``written``, just saved, is one) and remove the older ones;
    a damaged one among the newest is moved aside (see :func:`set_aside`), never counted."""
    good = 0
    for path in (p for p in list_checkpoints(out_dir) if _NUMBERED.fullmatch(p.name)):
        if good >= max(1, keep):
            _remove(path)  # beyond the newest good ones: what rotation is for, read or not
            continue
        problem = None if path == written else checkpoint_problem(path)
        if problem is None:
            good += 1
            continue
        aside = set_aside(path)
        if log is not None:
            log(f"warning: checkpoint {path} {problem}: it does not count toward --keep-checkpoints and was moved "
                f"aside to {aside.name} (never read; delete it when you no longer need it)")


def remove_stale(out_dir: Path) -> None:
    """Temporary files and folders that a kill during a save left behind (never read as checkpoints), and those
    of a rewrite of metrics.jsonl."""
    import itertools
    import shutil

    d = Path(out_dir)
    for stale in itertools.chain(d.glob(".checkpoint*.tmp"), d.glob(f".{METRICS}.*.tmp")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


class _RecordingWriter:
    """A file object for torch.save that remembers the first OSError of a write: torch's writer reports it as a
    RuntimeError ("[enforce fail at inline_container.cc...] unexpected pos ...") that names no cause."""

    def __init__(self, f) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, its cause or context, or a rank's failure inside a DCP
    CheckpointException (whatever wraps it)."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) and f else f for f in failures.values()]
    return None


def torch_save(obj: Any, f) -> None:
    """``torch.save(obj, f)``, where a failed write raises the OSError itself (ENOSPC, EFBIG, EIO, ...), not the
    RuntimeError torch wraps it in."""
    rec = _RecordingWriter(f)
    try:
        torch.save(obj, rec)
    except RuntimeError as e:
        cause = rec.error or _os_error_in(e)
        if cause is None:
            raise
        raise cause from None


_ADVICE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EFBIG: "the checkpoint is larger than the file-size limit (ulimit -f)",
           errno.EROFS: "the file system is read-only", errno.EACCES: "the folder is not writable",
           errno.EPERM: "the folder is not writable", errno.EIO: "the disk reported an error"}


def _write_failed(path: Path, e: OSError) -> TrainError:
    """One line: what could not be written, the cause by name, what is kept and what to do."""
    code = errno.errorcode.get(e.errno or -1, "")
    cause = (e.strerror or str(e)) + (f" ({code})" if code else "")
    if e.errno in _ADVICE:
        cause += f": {_ADVICE[e.errno]}"
    earlier = [p for p in list_checkpoints(path.parent) if p != path and checkpoint_problem(p) is None]
    kept = (f"the earlier checkpoints are kept (newest: {earlier[0].name}); continue with `sophia train --out-dir "
            f"{path.parent} --resume` once that is fixed") if earlier else "this run has no earlier checkpoint"
    return TrainError(f"could not write the checkpoint {path}: {cause}; {kept}")


def save_sharded_checkpoint(out_dir: Path, state: dict[str, Any], info: dict[str, Any], *, main: bool,
                            keep: int = 2, log: Log | None = _stderr) -> Path:
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
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(state, checkpoint_id=str(tmp))  # returns on every rank once the metadata is written
    except (CheckpointException, OSError, RuntimeError) as e:  # a rank's write failed: raised on every rank
        cause = _os_error_in(e)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if cause is None:
            raise
        raise _write_failed(final, cause) from None
    if main:
        try:
            atomic_write_bytes(tmp / SHARDED_META, lambda f: torch_save(info, f))
            fsync_dir(tmp)
            if final.exists():
                _remove(final)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_failed(final, e) from None
        _rotate(out_dir, keep, final, log)
    dist.barrier()  # nobody reads or writes the run folder before the checkpoint is in place
    return final


def save_checkpoint(out_dir: Path, state: dict[str, Any], keep: int = 2, log: Log | None = _stderr) -> Path:
    """Write ``checkpoint-STEP.pt`` atomically, then keep the newest ``keep`` readable step-numbered ones
    (see :func:`_rotate`). A failed write (a full disk) is a TrainError naming the cause; nothing else changes."""
    path = checkpoint_path(out_dir, int(state["step"]))
    try:
        atomic_write_bytes(path, lambda f: torch_save(state, f))
    except OSError as e:
        raise _write_failed(path, e) from None
    _rotate(out_dir, keep, path, log)
    return path


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return _read_sharded_meta(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DamagedCheckpointError(path, f"is corrupt or unreadable ({type(e).__name__}: {first})") from None
    missing = {"model", "step", "optimizer", "config", "rng"} - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise DamagedCheckpointError(path, f"lacks {sorted(missing)}: not written by sophia train")
    return ckpt


def _read_sharded_meta(path: Path) -> dict[str, Any]:
    """A DCP checkpoint folder's meta.pt (the tensors are read by :func:`load_sharded_model` or the trainer)."""
    if not (path / ".metadata").is_file() or not (path / SHARDED_META).is_file():
        raise DamagedCheckpointError(path, f"is incomplete (no .metadata or {SHARDED_META})")
    try:
        ckpt = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DamagedCheckpointError(path, f"is corrupt or unreadable ({type(e).__name__}: {first})") from None
    missing = {"step", "config", "rng", "model_config"} - set(ckpt) if isinstance(ckpt, dict) else {"step"}
    if missing:
        raise DamagedCheckpointError(path, f"lacks {sorted(missing)}: not written by sophia train")
    _check_shard_files(path)
    ckpt["format"] = "dcp"
    return ckpt


def _check_shard_files(path: Path) -> None:
    """DCP's ``.metadata`` reads and every shard file it names is there, long enough for its tensors (a cut or
    missing shard would otherwise surface only in the middle of loading)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
        needed: dict[str, int] = {}
        for info in storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # noqa: BLE001 - an unreadable or cut .metadata
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DamagedCheckpointError(path, f"is corrupt or unreadable (.metadata: {type(e).__name__}: {first})") \
            from None
    for name, size in sorted(needed.items()):
        f = path / name
        have = f.stat().st_size if f.is_file() else None
        if have is None or have < size:
            raise DamagedCheckpointError(path, f"is incomplete ({name} " + ("is missing" if have is None else
                                                                            f"has {have} of {size} bytes") + ")")


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


def load_checkpoint(out_dir: Path, purpose: str = "--resume", log: Log | None = None) -> dict[str, Any]:
    """The newest readable checkpoint of ``out_dir``, with its file under the key ``"path"``.

    Damaged newer ones are skipped (reported through ``log``, and listed as ``(path, reason)`` under the key
    ``"skipped"``); when none reads, the error names the newest."""
    paths = list_checkpoints(out_dir)
    if not paths:
        raise TrainError(f"{purpose}: no checkpoint in {out_dir}")
    first_error: TrainError | None = None
    skipped: list[tuple[str, str]] = []
    for path in paths:
        try:
            ckpt = _read_checkpoint(path)
        except DamagedCheckpointError as e:
            first_error = first_error or e
            skipped.append((str(path), e.reason))
            if log is not None:
                log(f"warning: {e}; trying an older one")
            continue
        ckpt["path"] = str(path)
        ckpt["skipped"] = skipped
        return ckpt
    assert first_error is not None
    raise first_error


def tokenizer_fingerprint(folder: Path) -> str | None:
    """sha256 of what defines the tokenizer of a dataset folder (or of a run's copy): the spec in ``meta.json``
    with a trained BPE's ``tokenizer.json``, or nanoGPT's ``meta.pkl`` (GPT-2 without one); None when that
    cannot be read. Dataset statistics (``created``, token counts) do not count."""
    d = Path(folder)
    h = hashlib.sha256()
    try:
        if (d / "meta.json").is_file():
            spec = json.loads((d / "meta.json").read_text(encoding="utf-8"))["tokenizer"].strip().lower()
            h.update(b"spec\0" + spec.encode())
            if spec.startswith("bpe") and (d / "tokenizer.json").is_file():
                h.update(b"\0tokenizer.json\0" + (d / "tokenizer.json").read_bytes())
        elif (d / "meta.pkl").is_file():
            h.update(b"meta.pkl\0" + (d / "meta.pkl").read_bytes())
        elif (d / "train.bin").is_file():
            h.update(b"spec\0gpt2")  # a nanoGPT folder without meta.pkl holds GPT-2 tokens
        else:
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return h.hexdigest()


def keep_tokenizer(out_dir: Path, dataset_dir: Path, log: Log | None = _stderr) -> None:
    """Copy the files that define the dataset's tokenizer (meta.json and a trained BPE's tokenizer.json, or
    nanoGPT's meta.pkl) into ``out_dir/tokenizer``, so sampling needs no dataset.

    A copy that holds another tokenizer (an earlier run's in a reused folder) or a damaged one is replaced: the
    new copy is written beside it and renamed into place, so ``tokenizer/`` is at every moment whole, the old
    one or the new one, or (after a kill between the two renames) absent, which sampling notices and the next
    run writes again."""
    import shutil

    out = Path(out_dir)
    target = out / TOKENIZER_DIR
    want = tokenizer_fingerprint(dataset_dir)
    if target.is_dir() and want is not None and tokenizer_fingerprint(target) == want:
        return
    for stale in out.glob(f".{TOKENIZER_DIR}.*.tmp"):  # left by a kill during an earlier copy
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TOKENIZER_DIR}.", suffix=".tmp", dir=out))
    old = out / f".{TOKENIZER_DIR}.old.tmp"
    try:
        copied = False
        for name in ("meta.json", "tokenizer.json", "meta.pkl"):
            if (Path(dataset_dir) / name).is_file():
                shutil.copy2(Path(dataset_dir) / name, tmp / name)
                copied = True
        if not copied:  # a nanoGPT folder without meta.pkl: GPT-2 tokens, said so for load_tokenizer
            (tmp / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "writer": "sophia-lab (the run's "
                                                       f"copy of {dataset_dir}, a nanoGPT folder)"}) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        replaced = target.exists() or target.is_symlink()
        if replaced:
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replaced:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
        if log is not None:
            log(f"{target} held another tokenizer (an earlier run's in this folder) or a damaged one: replaced by "
                f"the one of {dataset_dir}, which this run trains with")
