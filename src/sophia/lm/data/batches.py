"""Batches drawn from token files: random windows for training (resumable through the generator's state, split
across data-parallel ranks, fed to the device by :class:`Batches`) and a fixed set of them for evaluation."""

from __future__ import annotations

import numpy as np
import torch


def get_batch(data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator, *, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``data``: inputs ``x`` and targets ``y = x`` shifted by one, int64 on the
    CPU, both of shape (batch_size, block_size).

    The offsets come from ``torch.randint`` with ``generator``, so saving ``generator.get_state()`` makes the
    sequence resumable. Under data parallelism every rank draws ``world_size * batch_size`` offsets from a
    generator seeded alike and takes its own slice: the ranks see different windows and stay in step.
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} and world_size {world_size}")
    n = len(data)
    if n < block_size + 1:
        raise ValueError(f"the data has {n} tokens, fewer than block_size + 1 = {block_size + 1}; use a smaller "
                         "block_size or more data")
    offsets = torch.randint(n - block_size, (world_size * batch_size,), generator=generator)
    mine = offsets[rank * batch_size:(rank + 1) * batch_size].numpy()
    windows = torch.from_numpy(np.asarray(data[mine[:, None] + np.arange(block_size + 1)], dtype=np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def fixed_batches(data: np.ndarray, batch_size: int, block_size: int, n_batches: int, seed: int, *,
                  rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` batches of ``get_batch`` from a generator seeded with ``seed``: the same every time, for
    evaluation."""
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    generator = torch.Generator().manual_seed(seed)
    return [get_batch(data, batch_size, block_size, generator, rank=rank, world_size=world_size)
            for _ in range(n_batches)]


class Batches:
    """Training batches: random windows drawn by a generator whose state a checkpoint saves, this rank's share of
    the global batch, copied to the device (on CUDA from pinned memory, asynchronously, so that the next
    micro-batch's copy overlaps the current one's computation)."""

    def __init__(self, data: np.ndarray, block_size: int, seed: int, *, device: torch.device, rank: int = 0,
                 world_size: int = 1) -> None:
        self.data = data
        self.block_size = block_size
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device
        self.rank, self.world_size = rank, world_size

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = get_batch(self.data, batch_size, self.block_size, self.generator, rank=self.rank,
                         world_size=self.world_size)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def state(self) -> torch.Tensor:
        """The generator's state: where the sequence of batches stands (a checkpoint saves it)."""
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
