"""The one parser of --device (sophia.lm.device.resolve_device), for the plan, each rank of a run and the benchmarks."""

from __future__ import annotations

import pytest
import torch

from sophia.bench import machine
from sophia.lm import train
from sophia.lm.config import TrainError
from sophia.lm.device import resolve_device


def test_specs_and_their_refusals():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cpu:0", local_rank=1, world_size=2) == torch.device("cpu", 0)  # the rank is for GPUs
    for spec in ("tpu", "cuda:x", "auto"):
        with pytest.raises(TrainError, match=rf"^--device must be cpu or cuda\[:N\], got .{spec}.$"):
            resolve_device(spec)
    with pytest.raises(TrainError, match=r"^--device must be auto, cpu or cuda\[:N\], got 'tpu'$"):
        resolve_device("tpu", allow_auto=True)
    # a plan reads the spec only: CUDA devices this machine may lack
    assert resolve_device("cuda:3", check_machine=False) == torch.device("cuda", 3)
    with pytest.raises(TrainError, match="--device must be"):
        resolve_device("cuda:x", allow_auto=True, check_machine=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda():
    assert resolve_device("auto", allow_auto=True, local_rank=0, world_size=1) == torch.device("cpu")
    with pytest.raises(TrainError, match="^--device cuda:1: CUDA is not available on this machine$"):
        resolve_device("cuda:1")
    assert resolve_device("auto", allow_auto=True, check_machine=False) == torch.device("cpu")


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, the second current (only what resolve_device asks of torch.cuda)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


def test_a_rank_gets_its_own_gpu(two_gpus):
    assert resolve_device("auto", allow_auto=True) == torch.device("cuda")  # the benchmarks: as named
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    # a run alone: the named GPU, else the current one, always with its index
    assert resolve_device("auto", allow_auto=True, local_rank=0, world_size=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=0, world_size=1) == torch.device("cuda", 0)
    # under torchrun: the local rank's GPU
    assert resolve_device("cuda", local_rank=0, world_size=2) == torch.device("cuda", 0)
    assert resolve_device("auto", allow_auto=True, local_rank=1, world_size=4) == torch.device("cuda", 1)
    for spec, rank, world in (("cuda:2", None, 1), ("cuda:2", 0, 2), ("cuda", 2, 4)):
        with pytest.raises(TrainError, match=f"^--device {spec}: this machine has 2 CUDA device\\(s\\)$"):
            resolve_device(spec, local_rank=rank, world_size=world)


def test_the_harness_and_the_benchmarks_use_it(two_gpus):
    assert train.resolve_device("auto", 1, 2) == torch.device("cuda", 1)
    assert train.resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(TrainError, match="^--device must be auto, cpu or cuda"):
        train.resolve_device("gpu")
    assert machine.resolve_device is resolve_device
