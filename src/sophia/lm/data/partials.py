"""Unfinished work under temporary names: a dataset being built (``.NAME.partial-PID-RANDOM`` beside its target),
an archive being downloaded (``.download-PID-RANDOM``), and removing what an interrupted run left of them.

>>> bool(_PARTIAL_NAME.fullmatch(".shakespeare-byte.partial-4242-0a1b2c3d"))
True
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

Log = Callable[[str], None]
_PARTIAL_NAME = re.compile(r"\..+\.partial-\d+-[0-9a-f]+")  # where prepare builds a dataset before renaming it


def _remove_stale_partials(parent: Path, prefix: str, log: Log) -> None:
    """Remove temporary directories named ``PREFIX<pid>-<random>`` whose process is gone (a killed prepare);
    those of a live process (a prepare running now) are left alone."""
    for p in parent.glob(f"{prefix}*"):  # prefixes are path-safe names: no glob characters
        m = re.fullmatch(r"(\d+)-[0-9a-f]+", p.name[len(prefix):])
        if m is None or _process_alive(int(m.group(1))):
            continue
        log(f"removing {p}, left by an interrupted run")
        shutil.rmtree(p, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier call that could not clean up; no call of ours is still running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
