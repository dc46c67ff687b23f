"""What a ``--device`` option names, checked against this machine: the one parser of ``--device``, for sophia
train (its plan and each torchrun rank) and the benchmarks."""

from __future__ import annotations

import torch

from sophia.lm.config import TrainError


def resolve_device(spec: str, *, allow_auto: bool = False, local_rank: int | None = None, world_size: int = 1,
                   check_machine: bool = True) -> torch.device:
    """The device a ``--device`` option names, or TrainError saying why it cannot be used here.

    ``allow_auto``: ``auto`` is accepted too, meaning CUDA when this machine has it, else the CPU.
    ``local_rank`` (with ``world_size``): the device of this process as a rank of a run: under torchrun (world size
    above 1) its own GPU, ``cuda:LOCAL_RANK``; alone, the named GPU or the current one, always with its index.
    ``check_machine=False`` only reads the spec (a plan for another machine): CUDA need not be present.

    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("cuda:1", check_machine=False)
    device(type='cuda', index=1)
    """
    choices = ("auto, " if allow_auto else "") + "cpu or cuda[:N]"
    if allow_auto and spec == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif spec.split(":")[0] not in ("cpu", "cuda"):
        raise TrainError(f"--device must be {choices}, got {spec!r}")
    else:
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise TrainError(f"--device must be {choices}, got {spec!r}") from None
    if device.type != "cuda" or not check_machine:
        return device
    if not torch.cuda.is_available():
        raise TrainError(f"--device {spec}: CUDA is not available on this machine")
    _check_index(device, spec)
    if local_rank is not None:
        if world_size > 1:
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        _check_index(device, spec)
    return device


def _check_index(device: torch.device, spec: str) -> None:
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
