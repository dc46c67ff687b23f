"""The Triton multi-tensor kernel of the Sophia step (sophia.optim.triton_kernel).

Runs where triton is importable, either on CPU tensors under Triton's interpreter::

    TRITON_INTERPRET=1 python -m pytest tests/optim/test_triton_kernel.py

or compiled, on a CUDA device (without TRITON_INTERPRET). Skipped otherwise (the normal suite has no triton),
except the test of what happens without triton.

Tolerances. The kernel computes in float32 (float64 for float64) with two explicit fused multiply-adds (the
lerp, and the final ``p * decay - lr * r``). Compiled for a GPU these are single-rounding FMAs, as in torch's
CUDA kernels behind the for-loop path: there the kernel must equal the for-loop path bitwise. The interpreter
evaluates ``tl.fma`` with numpy as a float32 multiply then add (two roundings) and rounds every other
operation once, so there it must equal bitwise a float32 op-by-op evaluation of the same formula
(:func:`_unfused`); against the for-loop path, whose CPU kernels fuse the multiply-adds on AVX2/AVX-512
machines and not elsewhere, it differs by about one rounding per fused operation. Against the float64 formula
(:func:`_formula64`) and the for-loop path the test takes the error bound of that arithmetic, per element
(:func:`_bound`): a few units of the computation dtype's rounding on each operand's magnitude, the
division's error carried through ``lr``, plus half a unit of the stored dtype for the final rounding; nan and
inf must sit at the same places with the same signs.
"""

from __future__ import annotations

import sys

import pytest
import torch

from sophia.optim import functional as F
from sophia.optim import triton_kernel as K

HP = dict(lr=0.1, beta1=0.965, rho=0.05, weight_decay=0.1, eps=1e-15)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def test_without_triton_it_is_unavailable_and_importable(monkeypatch):
    # runs in the normal suite too: this module imports sophia.optim.triton_kernel without triton
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the "no CUDA" shortcut, to the import
    monkeypatch.setattr(K, "_kernel", None)
    monkeypatch.setattr(K, "_failure", None)
    assert K.available() is False
    assert "triton" in K.unavailable_reason() and "Error" in K.unavailable_reason()
    with pytest.raises(RuntimeError, match="available"):
        K.sophia_step_([], [], [], [], maximize=False, **HP)


def _device() -> str | None:
    return "cpu" if K._interpreting_env() else "cuda" if torch.cuda.is_available() else None


def _kernel_ready() -> str | None:
    """Why the kernel tests cannot run here, or None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if _device() is None:
        return "needs a CUDA device, or TRITON_INTERPRET=1 (Triton's interpreter, on CPU tensors)"
    if not K.available():
        return f"the Triton kernel is not available: {K.unavailable_reason()}"
    return None


needs_kernel = pytest.mark.skipif(_kernel_ready() is not None, reason=str(_kernel_ready()))
DEVICE = _device() or "cpu"
SIZES = [0, 1, 7, K.BLOCK - 1, K.BLOCK, K.BLOCK + 1, 3 * K.BLOCK + 5, 1000]


def _state(sizes, dtype, seed=0, device=None):
    """p, g, m, h with ratios m/max(rho*h, eps) on both sides of the clip, zero and negative curvature."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        p = torch.randn(n, generator=gen, dtype=torch.float64)
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        m = 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
        h = 20 * torch.rand(n, generator=gen, dtype=torch.float64)
        h[::11] = 0.0  # max(rho * h, eps) = eps: a sign step
        h[5::13] *= -1  # negative curvature: eps too
        out.append([t.to(dtype=dtype, device=device or DEVICE) for t in (p, g, m, h)])
    return [list(ts) for ts in zip(*out)] if out else [[], [], [], []]


def _clone(ts):
    return [t.clone() for t in ts]


def _formula64(p, g, m, h, lr, beta1, rho, weight_decay, eps, maximize):
    """The update in float64 from the stored inputs, independent of the project's code."""
    p, g, m, h = (t.double() for t in (p, g, m, h))
    if maximize:
        g = -g
    m = beta1 * m + (1 - beta1) * g
    d = torch.clamp(rho * h, min=eps)
    return p * (1 - lr * weight_decay) - lr * torch.clamp(m / d, -1.0, 1.0), m


def _bound(p, g, m, h, dtype, lr, beta1, rho, weight_decay, eps, maximize):
    """Per element: how far the kernel's p and m may be from the float64 formula (see the module docstring)."""
    u = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps  # computation dtype
    s = torch.finfo(dtype).eps  # stored dtype: its final rounding is at most half a unit
    ref_p, ref_m = _formula64(p, g, m, h, lr, beta1, rho, weight_decay, eps, maximize)
    p, g, m, h = (t.double() for t in (p, g, m, h))
    d = torch.clamp(rho * h, min=eps).abs()
    m_err = 4 * u * (m.abs() + g.abs())
    r_err = torch.clamp(m_err / d + 4 * u, max=2.0)
    p_err = 4 * u * (p.abs() * abs(1 - lr * weight_decay) + lr) + lr * r_err
    return ref_p, ref_m, p_err + s * ref_p.abs(), m_err + s * ref_m.abs()


def _assert_within(actual, expected, bound, what):
    a, e = actual.double().cpu(), expected.double().cpu()
    bound = bound.double().cpu()
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: nan at other places"
    inf = e.isinf()
    assert torch.equal(a.isinf(), inf) and torch.equal(a[inf], e[inf]), f"{what}: inf at other places or signs"
    fin = e.isfinite()
    excess = (a[fin] - e[fin]).abs() - bound[fin]
    assert excess.numel() == 0 or excess.max() <= 0, (
        f"{what}: off by {float((a[fin] - e[fin]).abs().max()):.3g}, over its bound by {float(excess.max()):.3g}")


def _assert_bitwise(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _unfused(p, g, m, h, lr, beta1, rho, weight_decay, eps, maximize):
    """The kernel's arithmetic as Triton's interpreter does it: every operation rounded once to the computation
    dtype (its fused multiply-adds too), half types converted in and rounded back to nearest even. Returns the
    new p and m in the stored dtype."""
    c = torch.float64 if p.dtype == torch.float64 else torch.float32
    s = lambda x: torch.tensor(x, dtype=torch.float64).to(c)  # noqa: E731  a Python scalar, rounded as torch does
    pf, gf, mf, hf = (t.to(c) for t in (p, g, m, h))
    if maximize:
        gf = -gf
    w = s(1 - beta1)
    if abs(float(w)) < 0.5:
        mn = mf + w * (gf - mf)
    else:
        mn = gf + (w - 1) * (gf - mf)
    d = hf * s(rho)
    d = torch.where(d < s(eps), s(eps), d)
    r = mn / d
    r = torch.where(r < -1, torch.ones_like(r).neg(), r)
    r = torch.where(r > 1, torch.ones_like(r), r)
    pn = pf * s(1 - lr * weight_decay) + r * (-s(lr))
    return pn.to(p.dtype), mn.to(p.dtype)


def _loop(ps, gs, ms, hs, **hp):
    ps, ms = _clone(ps), _clone(ms)
    F.sophia_update(ps, gs, ms, hs, implementation="for-loop", **hp)
    return ps, ms


def _check_all(ps0, gs, ms0, hs, ps, ms, hp, formula=True):
    """The kernel's results ps, ms (from ps0, ms0) against the float64 formula (unless ``formula`` is False:
    with inf in m, torch's lerp gives nan where the textbook formula does not), the for-loop path and, exactly,
    the interpreter's rounding (CPU) or the for-loop path (CUDA)."""
    lp, lm = _loop(ps0, gs, ms0, hs, **hp)
    for i, (p0, g, m0, h, p, m) in enumerate(zip(ps0, gs, ms0, hs, ps, ms)):
        tag = f"tensor {i} ({p.dtype}, {p.numel()} elements)"
        ref_p, ref_m, bp, bm = _bound(p0, g, m0, h, p.dtype, **hp)
        if formula:
            _assert_within(p, ref_p, bp, f"p vs float64 formula, {tag}")
            _assert_within(m, ref_m, bm, f"m vs float64 formula, {tag}")
        _assert_within(p, lp[i], 2 * bp, f"p vs for-loop path, {tag}")
        _assert_within(m, lm[i], 2 * bm, f"m vs for-loop path, {tag}")
        if K._interpret:
            up, um = _unfused(p0, g, m0, h, **hp)
            _assert_bitwise(p, up, f"p vs op-by-op rounding, {tag}")
            _assert_bitwise(m, um, f"m vs op-by-op rounding, {tag}")
        else:
            _assert_bitwise(p, lp[i], f"p vs for-loop path on CUDA, {tag}")
            _assert_bitwise(m, lm[i], f"m vs for-loop path on CUDA, {tag}")


@needs_kernel
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_formula_and_loop(dtype, maximize):
    ps0, gs, ms0, hs = _state(SIZES, dtype)
    hp = dict(HP, maximize=maximize)
    ps, ms = _clone(ps0), _clone(ms0)
    assert K.sophia_step_(ps, gs, ms, hs, **hp) == []
    _check_all(ps0, gs, ms0, hs, ps, ms, hp)
    # the data exercise both sides of the clip
    ratio = torch.cat([(m / torch.clamp(0.05 * h.double(), min=1e-15)).abs() for m, h in zip(ms, hs)])
    assert 0.1 < float((ratio < 1).double().mean()) < 0.9


@needs_kernel
def test_large_lerp_weight_and_no_decay():
    # beta1 < 0.5: torch's lerp takes its other formula, g - (1 - w) * (g - m)
    ps0, gs, ms0, hs = _state([5, K.BLOCK + 3], torch.float32, seed=1)
    hp = dict(lr=0.03, beta1=0.3, rho=0.5, weight_decay=0.0, eps=1e-12, maximize=False)
    ps, ms = _clone(ps0), _clone(ms0)
    assert K.sophia_step_(ps, gs, ms, hs, **hp) == []
    _check_all(ps0, gs, ms0, hs, ps, ms, hp)


def _offset_clone(t):
    """A contiguous copy of t one element into a buffer: not 16-byte aligned."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:]
    view.copy_(t)
    return view


@needs_kernel
def test_mixed_dtypes_and_alignments_in_one_call():
    # one group per (dtype, 16-byte aligned or not): several launches, each index right
    lists = [[], [], [], []]
    for j, dtype in enumerate(DTYPES):
        for t, part in zip(_state([3 + j, K.BLOCK + 2 * j + 1], dtype, seed=10 + j), lists):
            part.extend(t)
    # and an index of views one element into buffers: contiguous, not 16-byte aligned
    for t, part in zip(_state([K.BLOCK + 9], torch.float32, seed=20), lists):
        part.append(_offset_clone(t[0]))
    ps0, gs, ms0, hs = lists
    ps, ms = _clone(ps0[:-1]) + [_offset_clone(ps0[-1])], _clone(ms0[:-1]) + [_offset_clone(ms0[-1])]
    assert all(t[-1].data_ptr() % 16 != 0 for t in (ps, gs, ms, hs))
    hp = dict(HP, maximize=False)
    assert K.sophia_step_(ps, gs, ms, hs, **hp) == []
    _check_all(ps0, gs, ms0, hs, ps, ms, hp)


@needs_kernel
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's, in the interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate_like_the_loop(dtype):
    ps0, gs, ms0, hs = _state([40, K.BLOCK + 40], dtype, seed=2)
    inf, nan = float("inf"), float("nan")
    for p, g, m, h in zip(ps0, gs, ms0, hs):
        g[0], m[1], h[2], p[3] = nan, nan, nan, nan
        g[4], g[5], m[6], h[7], p[8] = inf, -inf, inf, inf, -inf
        h[9], m[9] = inf, inf  # inf / inf = nan
        g[10], m[10] = inf, -inf  # lerp of -inf towards inf: nan
        h[11] = -inf  # max(-inf * rho, eps) = eps
    hp = dict(HP, maximize=False)
    ps, ms = _clone(ps0), _clone(ms0)
    assert K.sophia_step_(ps, gs, ms, hs, **hp) == []
    _check_all(ps0, gs, ms0, hs, ps, ms, hp, formula=False)
    assert ps[0][:4].isnan().all() and ms[0][:2].isnan().all() and ps[0][9].isnan() and ms[0][10].isnan()


@needs_kernel
def test_skipped_indices_are_left_untouched():
    ps, gs, ms, hs = _state([6, 30, 12, 8, 9], torch.float32, seed=3)
    # 1: not contiguous; 2: mixed dtypes in the index; 3: another device; 4: a tensor subclass
    ps[1], gs[1], ms[1], hs[1] = (torch.randn(5, 6, device=DEVICE).t() for _ in range(4))
    assert not ps[1].is_contiguous()
    gs[2] = gs[2].double()
    other = "meta" if DEVICE == "cpu" else "cpu"
    ps[3], gs[3], ms[3], hs[3] = (t.to(other) for t in (ps[3], gs[3], ms[3], hs[3]))

    class Sub(torch.Tensor):
        pass

    ps[4] = ps[4].as_subclass(Sub)
    before = [(p.clone(), m.clone()) for p, m in zip(ps, ms)]
    hp = dict(HP, maximize=False)
    expected_p, expected_m = _loop(ps[:1], gs[:1], ms[:1], hs[:1], **hp)
    assert K.sophia_step_(ps, gs, ms, hs, **hp) == [1, 2, 3, 4]
    for i in (1, 2, 3, 4):
        if ps[i].device.type != "meta":
            assert torch.equal(ps[i], before[i][0]) and torch.equal(ms[i], before[i][1]), f"index {i} changed"
    torch.testing.assert_close(ps[0], expected_p[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ms[0], expected_m[0], rtol=1e-6, atol=1e-7)


@needs_kernel
def test_tables_are_reused_and_lr_may_change():
    ps0, gs, ms0, hs = _state([K.BLOCK + 1, 17], torch.bfloat16, seed=4)
    ps, ms = _clone(ps0), _clone(ms0)
    K._plans.clear()
    versions = [p._version for p in ps]
    for step, lr in enumerate([0.1, 0.01, 0.3]):  # a scheduler: new lr every step, one plan
        hp = dict(HP, lr=lr, maximize=False)
        ref_p, ref_m = _loop(ps, gs, ms, hs, **hp)
        K.sophia_step_(ps, gs, ms, hs, **hp)
        assert len(K._plans) == 1
        if step == 0:
            plan = next(iter(K._plans.values()))
        assert next(iter(K._plans.values())) is plan
        for a, b in zip(ps + ms, ref_p + ref_m):
            _assert_within(a, b, b.double().abs() * 2 ** -7 + 1e-6, f"step {step}")
    assert all(p._version > v for p, v in zip(ps, versions))  # in-place updates are recorded
    # a moved gradient (as after zero_grad(set_to_none=True)): a new plan, the right addresses
    gs = [g.clone() for g in gs]
    hp = dict(HP, maximize=True)
    ref_p, ref_m = _loop(ps, gs, ms, hs, **hp)
    K.sophia_step_(ps, gs, ms, hs, **hp)
    assert len(K._plans) == 2
    for a, b in zip(ps + ms, ref_p + ref_m):
        _assert_within(a, b, b.double().abs() * 2 ** -7 + 1e-6, "after the move")


@needs_kernel
def test_a_plan_used_in_a_capture_is_never_evicted(monkeypatch):
    # a CUDA graph replays the launch and keeps reading the plan's device tables: they must stay alive
    K._plans.clear()
    ps, gs, ms, hs = _state([5], torch.float32, seed=6)
    K.sophia_step_(ps, gs, ms, hs, maximize=False, **HP)  # planned outside a capture
    monkeypatch.setattr(K, "_capturing", lambda: True)
    K.sophia_step_(ps, gs, ms, hs, maximize=False, **HP)  # the call a capture would record
    monkeypatch.setattr(K, "_capturing", lambda: False)
    (captured,) = K._plans.values()
    assert captured.pinned
    others = [_state([3 + i], torch.float32, seed=10 + i) for i in range(K._CACHE_SIZE + 3)]
    for o in others:  # more new tensor sets than the cache holds
        K.sophia_step_(*o, maximize=False, **HP)
    assert captured in K._plans.values()
    assert sum(not v.pinned for v in K._plans.values()) == K._CACHE_SIZE  # the rest still bounded
    K._plans.clear()


@needs_kernel
def test_the_same_addresses_with_another_dtype_or_layout_get_a_new_plan():
    # the caching allocator hands a freed block to tensors of any dtype: the plan must not be found by address
    K._plans.clear()
    bufs = [torch.zeros(256, dtype=torch.float64, device=DEVICE) for _ in range(4)]
    gen = torch.Generator().manual_seed(8)
    for b in bufs:
        b.copy_(torch.rand(256, generator=gen, dtype=torch.float64))
    hp = dict(HP, maximize=False)
    K.sophia_step_(*[[b[:64]] for b in bufs], **hp)  # float64 tensors at these addresses
    # the same bytes as float32, the same element count: another dtype at the same addresses
    views = [b.view(torch.float32)[:64] for b in bufs]
    tail = bufs[0].view(torch.float32)[64:].clone()
    ps0, gs, ms0, hs = ([v.clone()] for v in views)
    K.sophia_step_(*[[v] for v in views], **hp)
    _check_all(ps0, gs, ms0, hs, [views[0]], [views[2]], hp)  # stepped as float32
    assert torch.equal(bufs[0].view(torch.float32)[64:], tail), "bytes past the parameter were written"
    assert len(K._plans) == 2
    # a non-contiguous gradient at the address of a contiguous one
    a = torch.rand(8, 16, generator=gen).to(DEVICE)
    p, m, h = (torch.rand(16, 8, generator=gen).to(DEVICE) for _ in range(3))
    K.sophia_step_([p], [a.view(16, 8)], [m], [h], **hp)
    before = (p.clone(), m.clone())
    g = a.view(8, 16).t()  # same address, transposed
    assert K.sophia_step_([p], [g], [m], [h], **hp) == [0]  # not taken: the caller steps it
    assert torch.equal(p, before[0]) and torch.equal(m, before[1])
    K._plans.clear()


@needs_kernel
def test_new_tensors_inside_a_capture_are_refused_clearly(monkeypatch):
    K._plans.clear()
    ps, gs, ms, hs = _state([9], torch.float32, seed=7)
    monkeypatch.setattr(K, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="outside the capture first"):
        K.sophia_step_(ps, gs, ms, hs, maximize=False, **HP)


def test_version_counters_are_bumped_on_a_torch_that_takes_one_tensor_at_a_time(monkeypatch):
    # torch < 2.5: increment_version takes one tensor; the list form raises there
    import torch.autograd.graph as graph

    real = graph.increment_version
    calls = []

    def one_at_a_time(t):
        if not isinstance(t, torch.Tensor):
            raise TypeError("increment_version expect a Tensor as input")
        calls.append(t)
        real(t)

    monkeypatch.setattr(graph, "increment_version", one_at_a_time)
    ts = [torch.zeros(2), torch.zeros(3)]
    versions = [t._version for t in ts]
    K._increment_versions(ts)
    assert len(calls) == 2 and all(t._version > v for t, v in zip(ts, versions))


@needs_kernel
def test_empty_lists_and_length_mismatch():
    assert K.sophia_step_([], [], [], [], maximize=False, **HP) == []
    ps, gs, ms, hs = _state([0, 0], torch.float32)
    assert K.sophia_step_(ps, gs, ms, hs, maximize=False, **HP) == []
    with pytest.raises(ValueError, match="same length"):
        K.sophia_step_(ps, gs[:1], ms, hs, maximize=False, **HP)


@needs_kernel
def test_sophia_g_with_fused_triton_follows_the_loop_through_refreshes():
    """The optimizer's opt-in path: SophiaG(fused="triton") over several steps with Hessian refreshes and a
    parameter the kernel does not take (non-contiguous: the multi-tensor path steps it), against the loop."""
    from sophia import SophiaG

    torch.manual_seed(0)
    base = [torch.randn(K.BLOCK + 9), torch.randn(33, 5), torch.randn(6, 4).t()]  # the last is non-contiguous
    runs = {}
    for impl in (dict(fused="triton"), dict(foreach=False)):
        ps = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in base]
        opt = SophiaG(ps, lr=0.05, rho=0.05, weight_decay=0.1, hessian_interval=3, **impl)
        gen = torch.Generator().manual_seed(1)
        for step in range(7):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            if step % 3 == 0:  # a refresh from given estimates
                opt.update_hessian(estimates=[torch.rand(p.shape, generator=gen).to(DEVICE) for p in ps])
            opt.step()
        if impl.get("fused") == "triton":
            assert opt._implementation(opt.param_groups[0], ps) == "triton"
        runs[impl.get("fused", "loop")] = [p.detach().double().cpu() for p in ps]
    for i, (a, b) in enumerate(zip(runs["triton"], runs["loop"])):
        if K._interpret:  # the interpreter rounds its fused multiply-adds twice: a few float32 units
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"parameter {i}: {m}")
        else:
            _assert_bitwise(a, b, f"parameter {i}")
