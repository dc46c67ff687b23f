"""What a ``--device`` option names, checked against this machine (shared by sophia train and the benchmarks)."""

from __future__ import annotations

import torch

from sophia.lm.config import TrainError


def resolve_device(spec: str, *, allow_auto: bool = False) -> torch.device:
    """The device a ``--device`` option names, or TrainError saying why it cannot be used here."""
    choices = ("auto, " if allow_auto else "") + "cpu or cuda[:N]"
    if allow_auto and spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.split(":")[0] not in ("cpu", "cuda"):
        raise TrainError(f"--device must be {choices}, got {spec!r}")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise TrainError(f"--device must be {choices}, got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
