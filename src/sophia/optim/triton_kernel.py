"""The SophiaG step on CUDA as one Triton kernel launch over all tensors of a list (multi-tensor).

One pass per element reads p, g, m, h and writes p, m (the update's 6 memory streams, no temporaries), for
every tensor of the list in a single launch per (device, dtype) group, instead of one or more kernels per
tensor and per operation.

Design:

* Tables on the device. Each tensor of a group is one row of int64 ``(p, g, m, h, numel, 0)`` (the data
  addresses, cast to pointers of the group's dtype inside the kernel); each program of the launch steps one
  block of ``BLOCK`` elements of one tensor, named by one int64 word ``tensor << 32 | block``. Rows and
  words are one int64 tensor, copied to the device once per new set of tensors.
* Caching. The tables are keyed by every tensor's address, dtype, size, contiguity and type (the allocator
  gives a freed address to tensors of any dtype, so addresses alone would not do) and kept in an LRU of 64
  (one plan per param group): a steady training loop, whose tensors keep their storage, rebuilds and copies
  nothing (moved gradients, e.g. after ``zero_grad(set_to_none=True)``, cost one rebuild, or none when the
  allocator hands back the same addresses).
* Hyperparameters are run-time kernel arguments (float64 bit patterns, unspecialised), converted to the
  computation dtype in the kernel: a scheduler changing lr every step never recompiles. What is compiled
  per variant is the dtype, whether all of a tensor's addresses are 16-byte aligned (then they are declared
  so, for 16-byte vector loads), maximize, and the lerp branch (``1 - beta1 < 0.5``, as torch's lerp).
* CUDA graphs: a call whose tables are cached launches only, and can be captured (the first call with new
  tensors copies tables to the device, which a capture forbids). A captured launch keeps reading its tables,
  so a plan used during a capture is pinned: never evicted from the cache, for the life of the process.
* Full blocks run unmasked; only each tensor's last block is masked (a mask against a loaded size would
  keep the compiler from vectorising every block).

Arithmetic: the for-loop path's (:func:`sophia.optim.functional._single_tensor`), operation for operation
(torch's lerp, the decay multiply, ``max(rho * h, eps)``, IEEE division, the clamp, ``add_`` with
``alpha = -lr``), in float32 for float32, float16 and bfloat16 tensors (stored back rounded once, to nearest
even) and float64 for float64; the lerp and the final add are explicit fused multiply-adds, as torch's CUDA
kernels (nvcc contracts them) and its AVX2/AVX-512 CPU kernels do them. nan and inf propagate as in the loop.

Where it runs: CUDA tensors (any GPU Triton supports). Under Triton's interpreter (``TRITON_INTERPRET=1``,
for tests) it steps CPU tensors instead: the kernel reads and writes through the raw addresses of its tables,
which the interpreter (numpy, no fused multiply-add) dereferences on the host. Triton is imported on first
use; without it, or without CUDA, :func:`available` is False.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from itertools import chain
from typing import Any

import torch
from torch import Tensor

__all__ = ["BLOCK", "NUM_WARPS", "available", "sophia_step_", "unavailable_reason"]

# Elements per program and warps per program. Not tuned yet: benchmarks/gpu/step_variants.py sweeps them on a GPU.
BLOCK = 2048
NUM_WARPS = 4

_CACHE_SIZE = 64  # plans kept (least recently used dropped): one per param group and optimizer in the process
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_PLAIN = (Tensor, torch.nn.Parameter)

_lock = threading.Lock()
tl: Any = None  # triton.language, once imported
_sophia_block: Any = None  # the kernel's per-block helper
_kernel: Any = None  # the jitted kernel, once triton is imported
_interpret = False  # whether _kernel is Triton's interpreter (TRITON_INTERPRET=1 when it was made)
_failure: str | None = None
_plans: OrderedDict[tuple, _Plan] = OrderedDict()  # least recently used first


def _make_kernel() -> None:
    """Import triton and define the kernel. Its body finds ``tl`` and the helper in this module's globals, set
    here (Triton's interpreter re-executes kernel sources with their globals only, without closures)."""
    global _kernel, _interpret, _sophia_block, tl
    import triton
    import triton.language as tl

    @triton.jit
    def _sophia_block(p_ptr, g_ptr, m_ptr, h_ptr, offs, mask, lr, w, rho, decay, eps,
                      MASKED: tl.constexpr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, SMALL: tl.constexpr,
                      MAXIMIZE: tl.constexpr, RTNE_BY_HAND: tl.constexpr):
        if MASKED:
            p = tl.load(p_ptr + offs, mask=mask)
            g = tl.load(g_ptr + offs, mask=mask)
            m = tl.load(m_ptr + offs, mask=mask)
            h = tl.load(h_ptr + offs, mask=mask)
        else:
            p = tl.load(p_ptr + offs)
            g = tl.load(g_ptr + offs)
            m = tl.load(m_ptr + offs)
            h = tl.load(h_ptr + offs)
        p = p.to(COMPUTE)
        g = g.to(COMPUTE)
        m = m.to(COMPUTE)
        h = h.to(COMPUTE)
        if MAXIMIZE:
            g = -g
        # torch's lerp: m + w * (g - m) for |w| < 0.5, else g - (1 - w) * (g - m) (= g + (w - 1) * (g - m))
        if SMALL:
            m = tl.fma(w, g - m, m)
        else:
            m = tl.fma(w - 1.0, g - m, g)
        d = h * rho
        d = tl.where(d < eps, eps, d)  # max(rho * h, eps); nan stays nan, as torch's clamp_min
        if COMPUTE == tl.float32:
            r = tl.math.div_rn(m, d)  # IEEE division (Triton's float32 `/` is an approximation)
        else:
            r = m / d
        r = tl.where(r < -1.0, -1.0, r)
        r = tl.where(r > 1.0, 1.0, r)
        p = tl.fma(r, -lr, p * decay)
        if RTNE_BY_HAND:
            # Only under Triton's interpreter, whose float32 -> bfloat16 cast truncates (the GPU's rounds to
            # nearest even): round to nearest even on the bits, as torch (and the GPU) do; nan stays nan.
            mb = m.to(tl.uint32, bitcast=True)
            pb = p.to(tl.uint32, bitcast=True)
            mb = tl.where(m != m, 0x7FC00000, mb + (0x7FFF + ((mb >> 16) & 1)))
            pb = tl.where(p != p, 0x7FC00000, pb + (0x7FFF + ((pb >> 16) & 1)))
            m_out = (mb >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            p_out = (pb >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            m_out = m.to(DTYPE)
            p_out = p.to(DTYPE)
        if MASKED:
            tl.store(m_ptr + offs, m_out, mask=mask)
            tl.store(p_ptr + offs, p_out, mask=mask)
        else:
            tl.store(m_ptr + offs, m_out)
            tl.store(p_ptr + offs, p_out)

    @triton.jit(do_not_specialize=["lr_bits", "w_bits", "rho_bits", "decay_bits", "eps_bits"])
    def sophia_multi_tensor(rows, blocks, lr_bits: tl.int64, w_bits: tl.int64, rho_bits: tl.int64,
                            decay_bits: tl.int64, eps_bits: tl.int64, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                            BLOCK: tl.constexpr, ALIGNED: tl.constexpr, SMALL: tl.constexpr,
                            MAXIMIZE: tl.constexpr, RTNE_BY_HAND: tl.constexpr):
        word = tl.load(blocks + tl.program_id(0))
        t = word >> 32
        start = (word - (t << 32)) * BLOCK  # int64: tensors of 2**31 elements and more
        row = rows + t * 6
        p_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
        m_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))
        h_ptr = tl.load(row + 3).to(tl.pointer_type(DTYPE))
        n = tl.load(row + 4)
        if ALIGNED:
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            h_ptr = tl.multiple_of(h_ptr, 16)
        # the hyperparameters: float64 bit patterns (the interpreter passes small ones as int32), rounded
        # once to the computation dtype as torch rounds a Python scalar
        lr = lr_bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE)
        w = w_bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE)
        rho = rho_bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE)
        decay = decay_bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE)
        eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE)
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:
            _sophia_block(p_ptr, g_ptr, m_ptr, h_ptr, offs, offs < n, lr, w, rho, decay, eps, False, DTYPE,
                          COMPUTE, SMALL, MAXIMIZE, RTNE_BY_HAND)
        else:
            _sophia_block(p_ptr, g_ptr, m_ptr, h_ptr, offs, offs < n, lr, w, rho, decay, eps, True, DTYPE,
                          COMPUTE, SMALL, MAXIMIZE, RTNE_BY_HAND)

    try:
        from triton import knobs  # triton >= 3.4

        _interpret = bool(knobs.runtime.interpret)
    except ImportError:
        _interpret = _interpreting_env()
    _kernel = sophia_multi_tensor


def _interpreting_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available() -> bool:
    """Whether the kernel can run here: Triton importable and a CUDA device present (or, for tests, Triton's
    interpreter selected with ``TRITON_INTERPRET=1``, which runs it on CPU tensors). Imports triton on the first
    call; never warns."""
    global _failure
    if _kernel is not None:
        return _interpret or torch.cuda.is_available()
    if _failure is not None:
        return False
    if not (_interpreting_env() or torch.cuda.is_available()):
        return False  # not remembered: CUDA may be made visible later in the process
    with _lock:
        if _kernel is None and _failure is None:
            try:
                _make_kernel()
            except Exception as e:  # no triton, or one whose API differs: the other paths instead
                first = str(e).strip().splitlines()
                _failure = f"{type(e).__name__}: {first[0] if first else ''}"
    return _kernel is not None


def unavailable_reason() -> str | None:
    """Why Triton could not be set up (after :func:`available` returned False for that reason), else None."""
    return _failure


def _bits(x: float) -> int:
    """A float64's bit pattern as a signed int64."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


class _Group:
    """One launch: the tensors of one device, dtype and alignment, and their tables on that device."""

    __slots__ = ("device", "dtype", "meta", "rows", "blocks", "n_blocks", "made_on", "constants")

    def __init__(self, device: torch.device, dtype: torch.dtype, aligned: bool, cells: list[int], block: int) -> None:
        self.device, self.dtype = device, dtype
        # the kernel's compile-time arguments that do not depend on the hyperparameters
        self.constants = dict(DTYPE=_tl_dtype(dtype), COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
                              BLOCK=block, ALIGNED=aligned, RTNE_BY_HAND=_interpret and dtype == torch.bfloat16,
                              num_warps=NUM_WARPS)
        n_tensors = len(cells) // 5
        rows = torch.tensor(cells, dtype=torch.int64).view(n_tensors, 5)  # p, g, m, h addresses; numel
        per = (rows[:, 4] + block - 1) // block
        self.n_blocks = int(per.sum())
        owner = torch.repeat_interleave(torch.arange(n_tensors, dtype=torch.int64), per)
        first = torch.cumsum(per, 0) - per
        words = (owner << 32) | (torch.arange(self.n_blocks, dtype=torch.int64) - first[owner])
        # rows padded to 6 ints (48 bytes), so that the block words start 16-byte aligned; one copy to the device
        host = torch.cat([torch.cat([rows, torch.zeros(n_tensors, 1, dtype=torch.int64)], 1).flatten(), words])
        self.meta = host.to(device)
        self.rows, self.blocks = self.meta[:6 * n_tensors], self.meta[6 * n_tensors:]
        self.made_on = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0


class _Plan:
    """What one list of tensors needs: the indices the kernel leaves to the caller, the indices it steps (for
    their version counters), and its launches."""

    __slots__ = ("skipped", "stepped", "groups", "pinned")

    def __init__(self, skipped: list[int], stepped: list[int], groups: list[_Group]) -> None:
        self.skipped, self.stepped, self.groups = skipped, stepped, groups
        self.pinned = False  # used in a CUDA-graph capture: its device tables must outlive the graph


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _remember(key: tuple, plan: _Plan) -> None:
    """Cache a plan, dropping the least recently used unpinned ones beyond the cache size (call under _lock)."""
    _plans[key] = plan
    unpinned = [k for k, v in _plans.items() if not v.pinned]
    for k in unpinned[:max(0, len(unpinned) - _CACHE_SIZE)]:
        del _plans[k]


def _takes(p: Tensor, g: Tensor, m: Tensor, h: Tensor, device_type: str) -> bool:
    dtype, device, size = p.dtype, p.device, p.numel()
    if device.type != device_type or dtype not in _FLOATS:
        return False
    for t in (p, g, m, h):
        if not (type(t) in _PLAIN and t.dtype == dtype and t.device == device and t.numel() == size
                and t.layout == torch.strided and t.is_contiguous() and not t.is_neg() and not t.is_conj()):
            return False
    return True


def _plan(params, grads, exp_avgs, hessians, block: int) -> _Plan:
    device_type = "cpu" if _interpret else "cuda"
    skipped: list[int] = []
    stepped: list[int] = []
    cells: dict[tuple, list[int]] = {}
    for i, (p, g, m, h) in enumerate(zip(params, grads, exp_avgs, hessians)):
        if not _takes(p, g, m, h, device_type):
            skipped.append(i)
            continue
        stepped.append(i)
        if p.numel() == 0:
            continue
        addresses = (p.data_ptr(), g.data_ptr(), m.data_ptr(), h.data_ptr())
        aligned = not any(a % 16 for a in addresses)
        cells.setdefault((p.device, p.dtype, aligned), []).extend((*addresses, p.numel()))
    groups = [_Group(device, dtype, aligned, c, block) for (device, dtype, aligned), c in cells.items()]
    return _Plan(skipped, stepped, groups)


def _signature(t: Tensor) -> tuple:
    # everything _takes and _plan read from a tensor: where it is, and what it holds there
    return t.data_ptr(), t.dtype, t.numel(), t.is_contiguous(), t.is_neg(), type(t)


def _key(params, grads, exp_avgs, hessians, block: int) -> tuple | None:
    """The cache key of a list: every tensor's address, dtype, size, contiguity and type (the caching allocator
    hands a freed address to tensors of any dtype, so the address alone does not identify a plan). None where
    an address cannot be read (tensors without storage): such lists are planned anew at every call."""
    try:
        return (block, int(NUM_WARPS), tuple(map(_signature, chain(params, grads, exp_avgs, hessians))))
    except Exception:
        return None


def _increment_versions(tensors: list[Tensor]) -> None:
    try:
        torch.autograd.graph.increment_version(tensors)
    except (TypeError, RuntimeError):  # torch < 2.5 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def sophia_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 hessians: Sequence[Tensor], *, lr: float, beta1: float, rho: float, weight_decay: float,
                 eps: float, maximize: bool) -> list[int]:
    """One Sophia step in place on the tensors the kernel takes: plain (not subclassed), dense, contiguous
    CUDA tensors (CPU tensors under the interpreter) of float32, float64, float16 or bfloat16, the four of an
    index of one dtype, device and size. Returns the indices of the others, left untouched. One launch per
    (device, dtype, 16-byte aligned or not) group, on the current stream. Call :func:`available` first.

    Which indices it takes, and its device tables, are cached by every tensor's address, dtype, size,
    contiguity and type: tensors re-created in the same place with the same layout (gradients re-created by
    backward) reuse the plan; anything else is planned anew. Inside a CUDA-graph capture it must find its
    plan cached (run one step with the same tensors outside the capture first), and the captured launch keeps
    the hyperparameters of that call (a scheduler's later lr does not reach a replay)."""
    if _kernel is None:
        raise RuntimeError("sophia's Triton kernel is not loaded; call sophia.optim.triton_kernel.available() first")
    n = len(params)
    if not (len(grads) == n and len(exp_avgs) == n and len(hessians) == n):
        raise ValueError("sophia_step_: params, grads, exp_avgs and hessians must have the same length")
    block = int(BLOCK)
    key = _key(params, grads, exp_avgs, hessians, block)
    with _lock:
        plan = _plans.get(key) if key is not None else None
        if plan is not None:
            _plans.move_to_end(key)
    if plan is None:
        if _capturing():
            raise RuntimeError("sophia's Triton kernel: these tensors are new to it inside a CUDA-graph capture, "
                               "which forbids copying its tables to the device; run one step with the same "
                               "tensors outside the capture first")
        plan = _plan(params, grads, exp_avgs, hessians, block)
        if key is not None:
            with _lock:
                _remember(key, plan)
    if not plan.pinned and plan.groups and _capturing():
        if key is None:
            raise RuntimeError("sophia's Triton kernel cannot be captured in a CUDA graph for tensors whose "
                               "addresses cannot be read")
        plan.pinned = True
    if plan.stepped:  # in-place updates: bump the version counters, as torch's own in-place ops do
        if not plan.skipped:
            _increment_versions([*params, *exp_avgs])
        else:
            _increment_versions([t for i in plan.stepped for t in (params[i], exp_avgs[i])])
    if not plan.groups:
        return list(plan.skipped)
    lr, beta1, weight_decay, maximize = float(lr), float(beta1), float(weight_decay), bool(maximize)
    weight = 1 - beta1
    scalars = (_bits(lr), _bits(weight), _bits(rho), _bits(1 - lr * weight_decay), _bits(eps))
    # torch's lerp picks its formula on the weight in its computation dtype: |w| < 0.5
    small64 = abs(weight) < 0.5
    small32 = abs(struct.unpack("<f", struct.pack("<f", weight))[0]) < 0.5
    for group in plan.groups:
        if group.n_blocks == 0:
            continue
        small = small64 if group.dtype == torch.float64 else small32
        launch = _kernel[(group.n_blocks,)]
        if group.device.type == "cuda":
            with torch.cuda.device(group.device):
                stream = torch.cuda.current_stream(group.device)
                if stream.stream_id != group.made_on:
                    # the tables were allocated on another stream: their eviction must wait for this launch
                    group.meta.record_stream(stream)
                launch(group.rows, group.blocks, *scalars, SMALL=small, MAXIMIZE=maximize, **group.constants)
        else:
            launch(group.rows, group.blocks, *scalars, SMALL=small, MAXIMIZE=maximize, **group.constants)
    return list(plan.skipped)
