"""Flushing denormal floats to zero on the CPU, without leaving the change behind.

Subnormal floats (below ~1.2e-38 in float32) take a slow microcode path on x86 CPUs. A
transformer whose attention has saturated produces many of them in its backward (measured
on the `small` preset: 0.3-2.8% of the q/k/v gradient entries, a forward+backward 1.5x slower).
Flushing them to zero changes results only below float32's normal range. GPUs are unaffected:
CUDA kernels run at full speed on denormals and this switch does not touch them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def flush_denormal_enabled() -> bool:
    """Whether this thread currently flushes denormals (torch has no getter: a subnormal is probed)."""
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    return bool((tiny * torch.tensor([1.0], dtype=torch.float32)).item() == 0.0)


def _start_thread_pool() -> None:
    """Run one op large enough to be split over torch's intra-op threads, so that the pool exists.

    The flush setting is per thread, and pool threads copy the creating thread's setting once, when they
    start: a pool started while a temporary setting is on would keep it after the setting is restored."""
    if torch.get_num_threads() > 1:
        torch.ones(1 << 18).mul_(1.0)


@contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """Set flush-to-zero for the block in the calling thread and restore its setting afterwards.

    Yields whether flushing is in effect (False where the CPU does not support it). torch's intra-op
    threads are left as they are (started beforehand, so the change cannot leak into them): with one
    thread, as the benchmarks run, it covers all the work; with several, the calling thread's share.
    A fresh process that wants every thread to flush sets it before its first parallel op, as
    ``sophia train`` does."""
    before = flush_denormal_enabled()
    if enabled == before:
        yield before
        return
    _start_thread_pool()
    supported = torch.set_flush_denormal(enabled)
    try:
        yield enabled and supported
    finally:
        torch.set_flush_denormal(before)
