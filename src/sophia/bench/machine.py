"""What machine a measurement was taken on; the checks a benchmark makes before it starts."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from sophia.lm.config import TrainError, check_writable_dir
from sophia.lm.device import resolve_device  # noqa: F401  (the benchmarks' --device)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that wall-clock timings are whole."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info() -> dict[str, object]:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def check_out_dir(out_dir: str | Path, outputs: Sequence[str], overwrite: bool) -> Path:
    """Refuse, before any work, an ``--out-dir`` that cannot be written or that holds an earlier
    run's results (any of ``outputs``) unless ``overwrite``; creates nothing."""
    out = Path(out_dir)
    check_writable_dir(out, "--out-dir")
    found = [name for name in outputs if (out / name).exists()]
    if found and not overwrite:
        raise TrainError(f"{out} already holds the results of an earlier run ({', '.join(found)}); "
                         "choose another --out-dir, or pass --overwrite to replace them")
    return out
