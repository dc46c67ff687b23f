"""Writing files so that a reader never sees half of one: the one place data preparation, checkpoints, tokenizers
and the benchmarks write through.

A file is written into a temporary file beside its target (a hidden name, so no listing counts it), flushed to
disk, then renamed over the target, and the folder entry is flushed too: after a crash or a full disk the target
holds either its old content or the new one, never a mixture. A write that fails removes its temporary file.

>>> import tempfile
>>> from pathlib import Path
>>> d = Path(tempfile.mkdtemp())
>>> atomic_write_json(d / "result.json", {"loss": 2.5})
>>> (d / "result.json").read_text()
'{\\n  "loss": 2.5\\n}\\n'
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, writer: Callable[[IO[bytes]], Any]) -> None:
    """Write through ``writer(file)`` (a binary file) into a temporary file beside ``path``, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); the target gets the permissions a plain open would give it
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``path``'s new content is ``text`` (UTF-8), all at once."""
    data = text.encode("utf-8")
    atomic_write_bytes(path, lambda f: f.write(data))


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    """``obj`` as JSON (``indent`` as :func:`json.dumps`, ``None`` for one line) and a final newline, all at once."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir"]
