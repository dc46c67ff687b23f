"""Property tests of SophiaG and SophiaH against independent float64 references."""

from __future__ import annotations

import copy
import io
import math
import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from sophia import SophiaG, SophiaH, convert_authors_state_dict
from sophia.optim import cpu_kernel
from sophia.optim import functional as optim_functional
from sophia.optim.functional import sophia_update

OPTIMIZERS = [SophiaG, SophiaH]
# dict(): the default, on CPU the C++ kernel (those cases are skipped where it cannot be built)
# fused="triton" steps CPU tensors through the multi-tensor path here (the Triton kernel is CUDA's, or the
# interpreter's under TRITON_INTERPRET=1: tests/optim/test_triton_kernel.py)
IMPLS = [dict(foreach=False), dict(foreach=True), dict(fused=True), dict(), dict(fused="triton")]
IMPL_IDS = ["for-loop", "foreach", "compiled", "cpu-kernel", "triton"]


def _skip_without_cpu_kernel():
    if not cpu_kernel.available():
        pytest.skip(f"the C++ CPU kernel cannot be built here ({cpu_kernel.unavailable_reason()})")


@pytest.fixture(autouse=True)
def _cpu_kernel_cases_need_the_kernel(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "cpu-kernel" in callspec.id:
        _skip_without_cpu_kernel()


# -- an independent float64 reference of the update (spec section 1) ---------------------
def reference_step(p, g, m, h, lr, b1, rho, wd, eps, maximize):
    g = -g if maximize else g
    m = b1 * m + (1 - b1) * g
    p = p * (1 - lr * wd)
    ratio = m / torch.maximum(rho * h, torch.full_like(h, eps))
    p = p - lr * torch.clamp(ratio, -1.0, 1.0)
    return p, m


def _params(shapes, dtype=torch.float64):
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


GROUP_SETTINGS = [
    dict(lr=0.01, betas=(0.9, 0.95), rho=0.05, weight_decay=0.1),
    dict(lr=0.003, betas=(0.965, 0.99), rho=0.5, weight_decay=0.0, maximize=True),
]


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_update_matches_float64_reference(cls, impl):
    torch.manual_seed(1)
    shapes = [[(3, 4), (5,)], [(2, 2, 2), (0,)]]  # a zero-size parameter included
    groups = [dict(params=_params(s), **kw) for s, kw in zip(shapes, GROUP_SETTINGS)]
    extra = dict(hessian_interval=10 ** 6) if cls is SophiaH else {}  # refreshes given explicitly
    opt = cls(groups, lr=1.0, eps=1e-12, **extra, **impl)
    ref = {id(p): (p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p))
           for g in groups for p in g["params"]}
    for t in range(40):
        for g in groups:
            for p in g["params"]:
                p.grad = torch.randn_like(p)
        if t % 7 == 3:  # one parameter without a gradient on some steps
            groups[0]["params"][1].grad = None
        opt.step()
        for g, kw in zip(groups, GROUP_SETTINGS):
            for p in g["params"]:
                if p.grad is None:
                    continue
                rp, rm, rh = ref[id(p)]
                rp, rm = reference_step(rp, p.grad, rm, rh, kw["lr"], kw["betas"][0], kw["rho"],
                                        kw["weight_decay"], 1e-12, kw.get("maximize", False))
                ref[id(p)] = (rp, rm, rh)
        if t % 5 == 4:  # refresh: half with N * grad**2, half with explicit (signed) estimates
            if t % 10 == 4:
                opt.update_hessian(bs=64)
                new = {id(p): 64 * p.grad ** 2 for g in groups for p in g["params"] if p.grad is not None}
            else:
                flat = [p for g in groups for p in g["params"]]
                est = [torch.randn_like(p) for p in flat]
                opt.update_hessian(estimates=est)
                new = {id(p): e for p, e in zip(flat, est)}
            for g, kw in zip(groups, GROUP_SETTINGS):
                for p in g["params"]:
                    if id(p) in new:
                        rp, rm, rh = ref[id(p)]
                        b2 = kw["betas"][1]
                        ref[id(p)] = (rp, rm, b2 * rh + (1 - b2) * new[id(p)])
    for g in groups:
        for p in g["params"]:
            rp, rm, rh = ref[id(p)]
            torch.testing.assert_close(p.detach(), rp, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["exp_avg"], rm, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["hessian"], rh, rtol=1e-10, atol=1e-12)
    assert opt.diagnostics()["hessian_updates"] == 8


def _random_lists(n_tensors=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (11,), (0,), (2, 3, 4), (1,)][:n_tensors]
    mk = [lambda s: torch.randn(s, generator=g, dtype=dtype),
          lambda s: torch.randn(s, generator=g, dtype=dtype),
          lambda s: torch.randn(s, generator=g, dtype=dtype),
          lambda s: torch.randn(s, generator=g, dtype=dtype).abs() * torch.randint(0, 2, s, generator=g)]
    return [[f(s) for s in shapes] for f in mk]


@pytest.mark.parametrize("maximize", [False, True])
def test_foreach_and_compiled_equal_for_loop(maximize):
    base = _random_lists()
    results = {}
    for impl in ("for-loop", "foreach", "compiled"):
        ps, gs, ms, hs = [[t.clone() for t in lst] for lst in base]
        for _ in range(3):
            sophia_update(ps, gs, ms, hs, lr=0.1, beta1=0.9, rho=0.3, weight_decay=0.2, eps=1e-12,
                          maximize=maximize, implementation=impl)
        results[impl] = (ps, ms)
    for impl in ("foreach", "compiled"):
        for a, b in zip(results["for-loop"][0] + results["for-loop"][1], results[impl][0] + results[impl][1]):
            if impl == "foreach":
                assert torch.equal(a, b), "foreach differs from the for-loop in float64"
            else:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# -- the C++ CPU kernel (the default on CPU) -------------------------------------------------------
# Its arithmetic is the for-loop path's operation for operation, with torch's multiply-adds fused as torch's
# AVX2/AVX-512 CPU kernels fuse them: bitwise equal to the loop where torch runs those and the kernel runs its
# FMA variant, within float rounding elsewhere (e.g. its portable variant on x86, which rounds twice).
EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _kernel_exact() -> bool:
    info = cpu_kernel.kernel_info() or ""
    return EXACT and ("AVX2+FMA" in info or "generic (FMA)" in info)


@pytest.fixture(params=["best", "generic"])
def kernel_variant(request):
    """The kernel variant chosen for this CPU, then the portable one (as on CPUs without AVX2/FMA/F16C)."""
    _skip_without_cpu_kernel()
    cpu_kernel._set_variant(request.param)
    yield request.param
    cpu_kernel._set_variant("best")


def _assert_same_as_loop(got, want, dtype):
    if _kernel_exact():
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        eps = torch.finfo(dtype).eps
        scale = float(want.abs().max()) if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=2 * eps, atol=2 * eps * scale)


def _unfused_step(ps, gs, ms, hs, lr, beta1, rho, weight_decay, eps, maximize):
    """The update with every operation rounded on its own (a multiply-add rounds twice), each a separate torch
    op in the op-math dtype, the result rounded once to the storage dtype: what the kernel's variant without
    FMA computes, on any machine."""
    for p, g, m, h in zip(ps, gs, ms, hs):
        dt = torch.float64 if p.dtype == torch.float64 else torch.float32
        pf, gf, mf, hf = p.to(dt), g.to(dt), m.to(dt), h.to(dt)
        gf = -gf if maximize else gf
        w = torch.tensor(1 - beta1, dtype=dt)  # torch's lerp: the weight in op math, and 1 - w there too
        diff = gf - mf
        mf = mf + diff * w if abs(float(w)) < 0.5 else gf + diff * (w - 1)
        denom = torch.clamp_min(hf * torch.tensor(rho, dtype=dt), torch.tensor(eps, dtype=dt))
        ratio = torch.clamp(mf / denom, -1, 1)
        pf = pf * torch.tensor(1 - lr * weight_decay, dtype=dt) + ratio * torch.tensor(-lr, dtype=dt)
        m.copy_(mf)
        p.copy_(pf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("beta1", [0.9, 0.3], ids=["small-weight", "large-weight"])  # torch's two lerp formulas
def test_cpu_kernel_equals_the_for_loop(dtype, maximize, beta1, kernel_variant):
    # odd sizes (vector tails), a zero-size tensor, and one larger than a thread's grain (both threads)
    shapes = [(7, 3), (11,), (0,), (2, 3, 4), (1,), (257, 37), (70001,)]
    g = torch.Generator().manual_seed(4)
    base = [[torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(3)]
    base.append([(torch.randn(s, generator=g, dtype=torch.float64).abs() * torch.randint(0, 2, s, generator=g))
                 .to(dtype) for s in shapes])  # some zero curvature: the eps floor and sign steps
    settings = dict(lr=0.1, beta1=beta1, rho=0.3, weight_decay=0.2, eps=1e-12, maximize=maximize)
    fused = "no FMA" not in cpu_kernel.kernel_info()
    out = {}
    for impl in ("for-loop", "cpu-kernel", "unfused"):
        ps, gs, ms, hs = [[t.clone() for t in lst] for lst in base]
        for _ in range(3):
            if impl == "unfused":
                _unfused_step(ps, gs, ms, hs, **settings)
            else:
                sophia_update(ps, gs, ms, hs, **settings, implementation=impl)
        out[impl] = ps + ms
    for got, loop, unfused in zip(out["cpu-kernel"], out["for-loop"], out["unfused"]):
        assert got.dtype == dtype
        if fused:
            _assert_same_as_loop(got, loop, dtype)
        else:  # rounding twice, wherever it runs
            assert torch.equal(got, unfused), (got - unfused).abs().max()


def test_cpu_kernel_propagates_nan_and_inf_like_the_loop():
    _skip_without_cpu_kernel()
    nan, inf = math.nan, math.inf
    base = [[torch.tensor([1.0, 1.0, nan, 1.0, 1.0, -2.0, 0.5, inf])],
            [torch.tensor([nan, 1.0, 1.0, inf, -inf, 0.0, 0.0, 1.0])],
            [torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])],
            [torch.tensor([1.0, nan, 1.0, 1.0, 1.0, inf, 0.0, 0.0])]]
    out = {}
    for impl in ("for-loop", "cpu-kernel"):
        ps, gs, ms, hs = [[t.clone() for t in lst] for lst in base]
        sophia_update(ps, gs, ms, hs, lr=0.1, beta1=0.9, rho=0.5, weight_decay=0.1, eps=1e-15, maximize=False,
                      implementation=impl)
        out[impl] = ps + ms
    for got, want in zip(out["cpu-kernel"], out["for-loop"]):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


def test_cpu_kernel_is_the_default_on_cpu_and_fused_false_is_the_loop(monkeypatch):
    _skip_without_cpu_kernel()
    def make():
        return [torch.nn.Parameter(torch.linspace(-1, 1, 40).reshape(5, 8)), torch.nn.Parameter(torch.ones(3))]

    def refused(*args, **kwargs):
        raise AssertionError("this path should not run")

    default, loop = make(), make()
    with monkeypatch.context() as m:
        m.setattr(optim_functional, "_single_tensor", refused)
        opt = SophiaG(default, lr=0.1)
        for p in default:
            p.grad = torch.full_like(p, 0.5)
        opt.step()  # the C++ kernel, not the loop
    with monkeypatch.context() as m:
        m.setattr(cpu_kernel, "sophia_step_", refused)
        opt = SophiaG(loop, lr=0.1, fused=False)
        for p in loop:
            p.grad = torch.full_like(p, 0.5)
        opt.step()
    for a, b, start in zip(default, loop, make()):
        _assert_same_as_loop(a.detach(), b.detach(), torch.float32)
        assert not torch.equal(a.detach(), start.detach())


def test_cpu_kernel_leaves_what_it_cannot_take_to_the_loop():
    _skip_without_cpu_kernel()
    g = torch.Generator().manual_seed(2)

    def params():
        g.manual_seed(2)
        return [torch.nn.Parameter(torch.randn(6, 4, generator=g).t()),  # not contiguous: the loop takes it
                torch.nn.Parameter(torch.randn(9, generator=g, dtype=torch.float64)),
                torch.nn.Parameter(torch.randn(5, 3, generator=g).to(torch.bfloat16)),
                torch.nn.Parameter(torch.randn(0, 3, generator=g)),
                torch.nn.Parameter(torch.randn(33, generator=g)),
                torch.nn.Parameter(torch.randn(3, generator=g))]  # never gets a gradient

    runs = {}
    for name, flags in (("kernel", {}), ("loop", dict(foreach=False))):
        ps = params()
        assert not ps[0].is_contiguous()
        opt = SophiaG(ps, lr=0.05, **flags)
        data = torch.Generator().manual_seed(3)
        for t in range(4):
            for p in ps[:-1]:
                p.grad = torch.randn(p.shape, generator=data).to(p.dtype)
            opt.step()
            if t == 1:
                opt.update_hessian(bs=8)
        assert ps[-1] not in opt.state
        runs[name] = [p.detach().clone() for p in ps] + [opt.state[p]["exp_avg"] for p in ps[:-1]]
    for got, want in zip(runs["kernel"], runs["loop"]):
        _assert_same_as_loop(got, want, got.dtype)


@pytest.mark.parametrize("src,dst", [(dict(), dict(foreach=False)), (dict(foreach=False), dict()),
                                     (dict(), dict(foreach=True))],
                         ids=["kernel-to-for-loop", "for-loop-to-kernel", "kernel-to-foreach"])
def test_state_dicts_move_between_the_cpu_kernel_and_the_other_paths(src, dst):
    _skip_without_cpu_kernel()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = SophiaG(model.parameters(), lr=3e-3, **src)
    _train(model, opt, 7, data_seed=1)
    saved = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = SophiaG(model2.parameters(), lr=0.5, **dst)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["foreach"] == src.get("foreach")  # the saved flags come along, as torch's do
    for group in opt2.param_groups:  # continue on the destination's own path
        group.update(foreach=dst.get("foreach"), fused=dst.get("fused"))
    _train(model, opt, 6, data_seed=2)
    _train(model2, opt2, 6, data_seed=2)
    for a, b in zip(model.parameters(), model2.parameters()):
        _assert_same_as_loop(b.detach(), a.detach(), torch.float32)


def test_cpu_kernel_steps_are_in_place_updates_that_autograd_sees():
    _skip_without_cpu_kernel()
    p = torch.nn.Parameter(torch.ones(4))
    opt = SophiaG([p], lr=0.1)
    p.grad = torch.ones(4)
    y = (p * p).sum()  # saves p for its backward
    version = p._version
    opt.step()
    assert p._version > version and opt.state[p]["exp_avg"]._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_under_torch_compile_the_default_step_is_traced_and_matches_the_kernel():
    # the kernel is opaque to the compiler: inside torch.compile the loop is traced and compiled instead
    _skip_without_cpu_kernel()
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3000))
    q = torch.nn.Parameter(p.detach().clone())
    compiled_opt, eager_opt = SophiaG([p], lr=0.05, weight_decay=0.1), SophiaG([q], lr=0.05, weight_decay=0.1)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step():
        compiled_opt.step()

    for _ in range(3):
        g = torch.randn(3000)
        p.grad, q.grad = g.clone(), g.clone()
        step()
        eager_opt.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled_opt.state[p]["exp_avg"], eager_opt.state[q]["exp_avg"])


def test_ninja_installed_beside_the_interpreter_is_found_without_an_activated_environment(monkeypatch, tmp_path):
    ninja = pytest.importorskip("ninja")
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler here")
    (tmp_path / "c++").symlink_to(compiler)
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without the environment's bin folder or /usr/bin
    monkeypatch.delenv("CXX", raising=False)
    assert cpu_kernel._missing_tool() is None
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR


def test_without_a_compiler_the_step_warns_once_and_uses_the_loop(monkeypatch):
    def no_compiler():
        raise RuntimeError("no C++ compiler ('c++' not found)")

    monkeypatch.setattr(cpu_kernel, "_op", None)
    monkeypatch.setattr(cpu_kernel, "_failure", None)
    monkeypatch.setattr(cpu_kernel, "_load", no_compiler)
    p, q = torch.nn.Parameter(torch.linspace(-1, 1, 7)), torch.nn.Parameter(torch.linspace(-1, 1, 7))
    opt, loop = SophiaG([p], lr=0.1), SophiaG([q], lr=0.1, foreach=False)
    with pytest.warns(RuntimeWarning, match=r"C\+\+ CPU kernel .* not available \(RuntimeError: no C\+\+ compiler"):
        p.grad = torch.ones(7)
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        p.grad = -torch.ones(7)
        opt.step()
    for g in (torch.ones(7), -torch.ones(7)):
        q.grad = g
        loop.step()
    assert torch.equal(p.detach(), q.detach())
    assert not cpu_kernel.available() and "no C++ compiler" in cpu_kernel.unavailable_reason()


def test_a_missing_compiler_is_named_before_any_build(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler .*no-such-c\\+\\+"):
        cpu_kernel._load()
    assert not list(tmp_path.rglob("*.o"))


def test_cpu_kernel_builds_where_a_compiler_and_ninja_are_present():
    missing = cpu_kernel._missing_tool()
    if missing is not None:
        pytest.skip(f"cannot build the C++ CPU kernel here: {missing}")
    assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    assert cpu_kernel.kernel_info()


def test_compiled_float32_close_to_eager():
    base = _random_lists(dtype=torch.float32, seed=3)
    out = {}
    for impl in ("foreach", "compiled"):
        ps, gs, ms, hs = [[t.clone() for t in lst] for lst in base]
        sophia_update(ps, gs, ms, hs, lr=0.01, beta1=0.965, rho=0.04, weight_decay=0.1, eps=1e-15,
                      maximize=False, implementation=impl)
        out[impl] = ps + ms
    for a, b in zip(out["foreach"], out["compiled"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_first_steps_are_sign_momentum_and_scheduler_drives_lr(cls):
    # h = 0 before any refresh: every coordinate is clipped, the step is exactly lr_t * sign(m).
    p = torch.randn(50, dtype=torch.float64, requires_grad=True)
    opt = cls([p], lr=0.1, weight_decay=0.0, **({"hessian_interval": 100} if cls is SophiaH else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for t in range(5):
        p.grad = torch.randn_like(p)
        before = p.detach().clone()
        opt.step()
        sched.step()
        m = opt.state[p]["exp_avg"]
        torch.testing.assert_close(p.detach() - before, -0.1 * 0.5 ** t * torch.sign(m), rtol=0, atol=1e-15)
    assert opt.win_rate() == 0.0


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_goes_downhill_on_a_small_model(cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.0,
              **({"hessian_interval": 5} if cls is SophiaH else {}))
    first = F.cross_entropy(model(x), y).item()
    for t in range(60):
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=cls is SophiaH and opt.hessian_due())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cls is SophiaG and t % 5 == 4:
            from sophia import categorical_sampled_loss, gnb_refresh
            gnb_refresh(opt, lambda: categorical_sampled_loss(model(x)))
    last = F.cross_entropy(model(x), y).item()
    assert last < 0.7 * first, (first, last)
    assert opt.diagnostics()["hessian_updates"] >= 11
    assert 0.0 < opt.win_rate() <= 1.0


# -- SophiaH's own refresh -----------------------------------------------------------------
def test_sophiah_folds_the_estimate_on_the_step_that_computes_it():
    # Diagonal quadratic: a Rademacher Hutchinson estimate u*(Hu) = u**2 * lam = lam exactly.
    lam = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    k, b1, b2, rho, lr = 3, 0.9, 0.8, 0.5, 0.05
    opt = SophiaH([x], lr=lr, betas=(b1, b2), rho=rho, weight_decay=0.0, hessian_interval=k)
    rp, rm, rh = x.detach().clone(), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t in range(1, 12):
        due = opt.hessian_due()
        assert due == (t > 1 and (t - 1) % k == 0), t
        loss = 0.5 * (lam * x * x).sum()
        loss.backward(create_graph=due)
        g = x.grad.detach().clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if due:
            rh = b2 * rh + (1 - b2) * lam
        rp, rm = reference_step(rp, g, rm, rh, lr, b1, rho, 0.0, 1e-15, False)
        torch.testing.assert_close(x.detach(), rp, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[x]["hessian"], rh, rtol=1e-12, atol=1e-14)
    assert opt.diagnostics()["hessian_updates"] == 3


def test_sophiah_without_graph_raises_and_changes_nothing():
    x = torch.randn(4, requires_grad=True)
    opt = SophiaH([x], hessian_interval=1)
    x.grad = torch.randn(4)
    opt.step()  # step 1: no refresh due
    assert opt.hessian_due()
    (x ** 4).sum().backward()  # no create_graph
    before = copy.deepcopy(opt.state_dict()), x.detach().clone()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()
    assert torch.equal(x.detach(), before[1])
    assert opt.state[x]["step"].item() == 1.0


def test_sophiah_closure_estimator_path_needs_no_create_graph():
    lam = torch.tensor([1.0, 10.0], dtype=torch.float64)
    x = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    opt = SophiaH([x], betas=(0.9, 0.5), hessian_interval=1)
    from sophia import hutchinson

    def loss_fn(ps):
        return 0.5 * (lam * ps[0] ** 2).sum()

    for _ in range(3):
        if opt.hessian_due():
            opt.update_hessian(estimates=hutchinson(loss_fn, [x], method="forward_over_reverse"))
        loss_fn([x]).backward()  # plain backward
        opt.step()
        opt.zero_grad(set_to_none=True)
    # refreshes after steps 1 and 2, each exactly lam: h = 0.5*(0.5*lam) + 0.5*lam
    torch.testing.assert_close(opt.state[x]["hessian"], 0.75 * lam)
    assert opt.diagnostics()["hessian_updates"] == 2


def test_sophiah_maximize_uses_curvature_of_negated_objective():
    lam = torch.tensor([2.0, 4.0], dtype=torch.float64)
    x = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    opt = SophiaH([x], betas=(0.9, 0.0), hessian_interval=1, maximize=True)
    for _ in range(2):
        (-0.5 * (lam * x * x).sum()).backward(create_graph=opt.hessian_due())
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.testing.assert_close(opt.state[x]["hessian"], lam)


# -- state_dict ------------------------------------------------------------------------------
def _train(model, opt, steps, data_seed, refresh_every=3):
    g = torch.Generator().manual_seed(data_seed)
    for t in range(steps):
        x = torch.randn(16, 5, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=isinstance(opt, SophiaH) and opt.hessian_due())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if isinstance(opt, SophiaG) and t % refresh_every == refresh_every - 1:
            from sophia import categorical_sampled_loss, gnb_refresh
            gnb_refresh(opt, lambda x=x: categorical_sampled_loss(model(x), generator=g))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_state_dict_round_trip_then_both_continue_bitwise_equal(cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    extra = dict(hessian_interval=2) if cls is SophiaH else {}
    opt = cls([{"params": model[0].parameters(), "lr": 1e-2},
               {"params": model[2].parameters(), "rho": 0.2, "weight_decay": 0.0}], lr=3e-3, **extra)
    _train(model, opt, 7, data_seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = copy.deepcopy(model)
    for p in model2.parameters():
        p.data.normal_()
    opt2 = cls([{"params": model2[0].parameters()}, {"params": model2[2].parameters()}], lr=0.5, **extra)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[1]["rho"] == 0.2
    assert opt2.diagnostics()["hessian_updates"] == opt.diagnostics()["hessian_updates"] > 0
    if cls is SophiaH:
        opt.generator = torch.Generator().manual_seed(5)
        opt2.generator = torch.Generator().manual_seed(5)
    _train(model, opt, 6, data_seed=2)
    _train(model2, opt2, 6, data_seed=2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["hessian"], b["hessian"]) and torch.equal(a["exp_avg"], b["exp_avg"])


def test_authors_state_dict_converts_and_continues_like_theirs():
    sophia_opt = pytest.importorskip("sophia_opt")
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4).double()
    theirs = sophia_opt.SophiaG(model.parameters(), lr=1e-2, rho=0.05, weight_decay=0.1)
    bs = 40
    g = torch.Generator().manual_seed(0)

    def run(m, opt, steps, ours):
        for t in range(steps):
            x = torch.randn(bs, 6, generator=g, dtype=torch.float64)
            y = torch.randint(0, 4, (bs,), generator=g)
            F.cross_entropy(m(x), y).backward()
            if ours:
                opt.step()
            else:
                opt.step(bs=bs)
            opt.zero_grad(set_to_none=True)
            if t % 2 == 1:
                F.cross_entropy(m(x), y).backward()  # any gradient stands in for the sampled one
                if ours:
                    opt.update_hessian(bs=bs)
                else:
                    opt.update_hessian()
                opt.zero_grad(set_to_none=True)

    run(model, theirs, 6, ours=False)
    sd = copy.deepcopy(theirs.state_dict())
    mine_model = copy.deepcopy(model)
    mine = SophiaG(mine_model.parameters())
    with pytest.raises(ValueError, match="convert_authors_state_dict"):
        mine.load_state_dict(sd)
    mine.load_state_dict(convert_authors_state_dict(sd, bs=bs))
    assert mine.param_groups[0]["rho"] == 0.05 and mine.param_groups[0]["lr"] == 1e-2
    g_state = g.get_state()
    run(model, theirs, 6, ours=False)
    g.set_state(g_state)
    run(mine_model, mine, 6, ours=True)
    for a, b in zip(model.parameters(), mine_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# -- dtypes and odd parameters ---------------------------------------------------------------
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_bf16_parameters_step_like_float64_then_rounded(cls):
    # Each bf16 step equals the float64 formula applied to the bf16 values, up to bf16 rounding.
    torch.manual_seed(0)
    p = torch.randn(300).to(torch.bfloat16).requires_grad_(True)
    lr, wd, b1, rho = 1e-2, 0.1, 0.965, 0.04
    opt = cls([p], lr=lr, weight_decay=wd, rho=rho, **(dict(hessian_interval=10 ** 6) if cls is SophiaH else {}))
    for t in range(12):
        p.grad = torch.randn(300).to(torch.bfloat16)
        st = opt.state.get(p, {})
        m0 = st["exp_avg"].double() if st else torch.zeros(300, dtype=torch.float64)
        h0 = st["hessian"].double() if st else torch.zeros(300, dtype=torch.float64)
        ref_p, ref_m = reference_step(p.detach().double(), p.grad.double(), m0, h0, lr, b1, rho, wd, 1e-15, False)
        opt.step()
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert opt.state[p]["hessian"].dtype == torch.bfloat16
        torch.testing.assert_close(p.detach().double(), ref_p, rtol=2 ** -7, atol=lr * 2 ** -5)
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), ref_m, rtol=2 ** -7, atol=1e-3)
        if t % 4 == 3:
            opt.update_hessian(bs=10)
    assert opt.hessian_norm() > 0


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_complex_parameters_are_refused(cls):
    with pytest.raises(ValueError, match="complex"):
        cls([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_sparse_gradients_are_refused(cls):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = cls(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_params_without_grad_get_no_state(cls):
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = cls([a, b])
    a.grad = torch.randn(3)
    opt.step()
    opt.update_hessian(bs=4)
    assert b not in opt.state and torch.equal(opt.state[a]["step"], torch.tensor(1.0))


# -- bad input ---------------------------------------------------------------------------------
BAD_ARGS = [
    ("lr", dict(lr=-1.0)), ("lr", dict(lr=float("nan"))), ("betas", dict(betas=(1.0, 0.99))),
    ("betas", dict(betas=(0.9, -0.1))), ("betas", dict(betas=(0.9,))), ("rho", dict(rho=-0.1)),
    ("weight_decay", dict(weight_decay=-1e-3)), ("eps", dict(eps=0.0)), ("eps", dict(eps=-1.0)),
    ("lr", dict(lr="fast")), ("foreach", dict(foreach=True, fused=True)),
]


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("name,kwargs", BAD_ARGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ARGS)])
def test_bad_arguments_raise_value_error_naming_them(cls, name, kwargs):
    with pytest.raises(ValueError, match=name):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("kwargs", [dict(hessian_interval=0), dict(hessian_interval=2.5),
                                    dict(distribution="uniform")])
def test_sophiah_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SophiaH([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_param_group_is_refused_when_added():
    opt = SophiaG([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "rho": -1})


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one"), (dict(bs=0), "bs"), (dict(bs=True), "bs"),
    (dict(bs=4, estimates=[None]), "exactly one"), (dict(estimates=[torch.zeros(3)]), "shape"),
    (dict(estimates=[None, None]), "entries"), (dict(estimates={torch.zeros(2): torch.zeros(2)}), "not a parameter"),
])
def test_update_hessian_bad_input(kwargs, match):
    opt = SophiaG([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match=match):
        opt.update_hessian(**kwargs)


def test_nonfinite_hessian_estimate_is_skipped_counted_and_warned_once():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = SophiaG([a, b], betas=(0.9, 0.5))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.update_hessian(estimates=[torch.tensor([1.0, float("nan"), 1.0]), torch.full((3,), 2.0)])
    assert "hessian" not in opt.state[a]  # skipped: never touched
    assert torch.equal(opt.state[b]["hessian"], torch.full((3,), 1.0))
    a.grad, b.grad = torch.tensor([float("inf"), 0.0, 0.0]), torch.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.update_hessian(bs=2)  # a skipped again, silently
    assert "hessian" not in opt.state[a]
    assert torch.equal(opt.state[b]["hessian"], torch.full((3,), 1.5))
    d = opt.diagnostics()
    assert d["hessian_skipped"] == 2 and d["hessian_updates"] == 2


def test_overflowing_gnb_estimate_is_skipped():
    a = torch.ones(2, requires_grad=True)
    opt = SophiaG([a])
    a.grad = torch.tensor([1e30, 1.0])  # bs * g**2 overflows float32
    with pytest.warns(RuntimeWarning):
        opt.update_hessian(bs=10)
    assert "hessian" not in opt.state[a]
    assert opt.diagnostics()["hessian_skipped"] == 1


def test_win_rate_and_hessian_norm_against_formula():
    p = torch.zeros(4, requires_grad=True)
    opt = SophiaG([p], rho=0.5)
    p.grad = torch.zeros(4)
    opt.step()
    opt.state[p]["exp_avg"].copy_(torch.tensor([0.1, -0.1, 2.0, 0.0]))
    opt.state[p]["hessian"].copy_(torch.tensor([1.0, 0.1, 1.0, 3.0]))
    # |m| < max(0.5 h, eps): 0.1 < 0.5 yes; 0.1 < 0.05 no; 2 < 0.5 no; 0 < 1.5 yes
    assert opt.win_rate() == 0.5
    assert math.isclose(opt.hessian_norm(), math.sqrt(1 + 0.01 + 1 + 9), rel_tol=1e-6)


# -- the paper's motivating case ---------------------------------------------------------------
def _steps_to_target(make, lr, exact_curvature, lam, x0, target, max_steps=300):
    x = x0.clone().requires_grad_(True)
    opt = make([x], lr)
    for t in range(max_steps + 1):
        loss = 0.5 * (lam * x * x).sum()
        if loss.item() <= target:
            return t
        if exact_curvature:
            opt.update_hessian(estimates=[lam])
        loss.backward(create_graph=isinstance(opt, SophiaH) and opt.hessian_due())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return math.inf


def test_heterogeneous_curvature_sophia_needs_far_fewer_steps_than_tuned_adam():
    """Curvatures 1e-2 .. 1e2 on one loss: Adam-type steps ignore them, Sophia's divide by them.

    Every optimizer gets the same lr grid and a small momentum grid, and is judged at its
    best setting by the steps to reduce the loss by 1e6. SophiaG gets the exact diagonal,
    SophiaH estimates it by Hutchinson through create_graph backward (exact here: the
    Hessian is diagonal and the probes are Rademacher).
    """
    dt = torch.float64
    lam = torch.logspace(-2, 2, 10, dtype=dt)
    x0 = torch.randn(10, generator=torch.Generator().manual_seed(1), dtype=dt) * 3
    target = 1e-6 * (0.5 * (lam * x0 * x0).sum()).item()
    lrs = [10 ** (e / 2) for e in range(-4, 3)]  # 1e-2 .. 10
    adam_betas = [(0.9, 0.999), (0.9, 0.99), (0.5, 0.9), (0.0, 0.99)]
    b1s = [0.0, 0.5, 0.9]
    adam = min(_steps_to_target(lambda p, lr, b=b: torch.optim.Adam(p, lr=lr, betas=b), lr, False,
                                lam, x0, target) for b in adam_betas for lr in lrs)
    g = min(_steps_to_target(lambda p, lr, b1=b1: SophiaG(p, lr=lr, rho=1.0, betas=(b1, 0.0),
                                                          weight_decay=0.0), lr, True, lam, x0, target)
            for b1 in b1s for lr in lrs)
    h = min(_steps_to_target(lambda p, lr, b1=b1: SophiaH(p, lr=lr, rho=1.0, betas=(b1, 0.0), weight_decay=0.0,
                                                          hessian_interval=1), lr, False, lam, x0, target)
            for b1 in b1s for lr in lrs)
    assert math.isfinite(adam) and adam >= 15, adam  # tuned Adam does converge, but slowly
    assert 3 * g <= adam, (g, adam)
    assert 3 * h <= adam, (h, adam)


# -- cuda_graph: what can be checked without a GPU (tests/gpu checks the graph itself) -------------
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_cuda_graph_refuses_cpu_parameters_at_construction(cls):
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA parameters.*on cpu"):
        cls([torch.nn.Parameter(torch.randn(4))], cuda_graph=True)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_cuda_graph_group_of_cpu_parameters_is_refused_when_added(cls):
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="needs CUDA parameters"):
        cls([{"params": [a]}, {"params": [b], "cuda_graph": True}])
    opt = cls([a])
    with pytest.raises(ValueError, match="needs CUDA parameters"):
        opt.add_param_group({"params": [b], "cuda_graph": True})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_cuda_graph_parameters_moved_off_the_gpu_later_are_refused_at_step(cls):
    # the step keeps its own check: a CPU tensor can reach a group after construction
    a = torch.nn.Parameter(torch.randn(4))
    opt = cls([a])
    opt.param_groups[0]["cuda_graph"] = True
    a.grad = torch.randn(4)
    before = a.detach().clone()
    with pytest.raises(ValueError, match="needs CUDA parameters"):
        opt.step()
    assert torch.equal(a.detach(), before) and len(opt.state) == 0


@pytest.mark.parametrize("kwargs,match", [(dict(cuda_graph=1), "cuda_graph must be a bool"),
                                          (dict(cuda_graph=True, foreach=True), "excludes foreach"),
                                          (dict(cuda_graph=True, fused="triton"), "excludes fused='triton'"),
                                          (dict(foreach=True, fused="triton"), "fused='triton' are exclusive"),
                                          (dict(fused="cuda"), "fused must be True, False, None or 'triton'")])
def test_cuda_graph_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SophiaG([torch.nn.Parameter(torch.randn(2))], **kwargs)


def test_state_dict_saved_before_cuda_graph_existed_loads():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    old = SophiaG([p], lr=0.01)
    old.step()
    sd = old.state_dict()
    for g in sd["param_groups"]:
        del g["cuda_graph"]
    new = SophiaG([p])
    new.load_state_dict(sd)
    assert new.param_groups[0]["cuda_graph"] is False and new.param_groups[0]["lr"] == 0.01


# -- half-precision parameters: float32 arithmetic, stored back --------------------------------
HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_float16_coordinates_without_gradient_or_curvature_stay_finite(cls, impl):
    # eps = 1e-15 is 0 in float16: m = 0 and h = 0 once gave 0/0 = nan.
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = cls([p], lr=0.1, **impl)
    p.grad = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float16)
    opt.step()
    # float64 formula: decay by lr * wd = 0.01, then a full sign step where m != 0, nothing where m = 0
    expected = torch.tensor([0.99 - 0.1, 0.99, 0.99 + 0.1, 0.99], dtype=torch.float64).to(torch.float16)
    assert torch.equal(p.detach(), expected), p
    assert opt.win_rate() == 0.5  # m = 0 < max(rho * 0, eps): unclipped, as in float32


def _half_trajectory(cls, impl, dtype, steps=24):
    """Steps with half parameters; each checked against the float64 formula applied to the stored
    values, rounded once to the dtype. Returns the parameters."""
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(257, generator=gen).to(dtype))
    lr, wd, b1, rho = 2e-2, 0.1, 0.9, 0.05
    extra = dict(hessian_interval=10 ** 6) if cls is SophiaH else {}
    opt = cls([p], lr=lr, weight_decay=wd, rho=rho, betas=(b1, 0.99), **extra, **impl)
    mismatched = 0
    for t in range(steps):
        g = torch.randn(257, generator=gen) * (torch.rand(257, generator=gen) > 0.2)  # some exact zeros
        p.grad = g.to(dtype)
        st = opt.state.get(p)
        m0 = st["exp_avg"].double() if st else torch.zeros(257, dtype=torch.float64)
        h0 = st["hessian"].double() if st else torch.zeros(257, dtype=torch.float64)
        ref_p, ref_m = reference_step(p.detach().double(), p.grad.double(), m0, h0, lr, b1, rho, wd, 1e-15, False)
        opt.step()
        assert opt.state[p]["exp_avg"].dtype == dtype and torch.isfinite(p).all()
        # float32 arithmetic rounded once: the float64 result rounded, but for rare double roundings (1 ulp)
        for got, want in ((p.detach(), ref_p.to(dtype)), (opt.state[p]["exp_avg"], ref_m.to(dtype))):
            mismatched += int((got != want).sum())
            ulp = torch.finfo(dtype).eps * want.double().abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((got.double() - want.double()).abs() <= ulp).all()
        if t % 6 == 5:
            opt.update_hessian(bs=100)
    assert mismatched <= 0.01 * 2 * steps * 257
    return p.detach()


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_half_parameters_step_like_float64_rounded_once(dtype, impl):
    _half_trajectory(SophiaG, impl, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_half_parameter_paths_agree_and_sophiah_too(dtype):
    paths = [_half_trajectory(SophiaG, impl, dtype) for impl in IMPLS[:2]]
    assert torch.equal(paths[0], paths[1])  # for-loop and foreach: the same float32 arithmetic
    torch.testing.assert_close(_half_trajectory(SophiaH, IMPLS[0], dtype), paths[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_half_trajectory_stays_near_the_float32_one(dtype):
    # Half parameters round every update (a bf16 weight near 1 cannot move by less than 2**-8), so the
    # trajectories part; the loss they reach must stay close to the float32 run's.
    gen = torch.Generator().manual_seed(9)
    init = torch.randn(64, 32, generator=gen)
    x, w = torch.randn(128, 32, generator=gen), torch.randn(32, 64, generator=gen)

    def loss_of(p, d, noise=None):
        target = x.to(d) @ w.to(d) + (noise.to(d) if noise is not None else 0)
        return ((x.to(d) @ p.T - target) ** 2).float().mean()

    runs = {}
    for d in (torch.float32, dtype):
        noise = torch.Generator().manual_seed(10)  # the same sampled targets for both runs
        p = torch.nn.Parameter(init.clone().to(d))
        opt = SophiaG([p], lr=1e-2, rho=0.05, weight_decay=0.0)
        for t in range(60):
            loss_of(p, d).backward()
            opt.step()
            if t % 10 == 9:
                p.grad = None
                loss_of(p, d, torch.randn(128, 64, generator=noise)).backward()
                opt.update_hessian(bs=128 * 64)
            opt.zero_grad(set_to_none=True)
        assert torch.isfinite(p).all()
        runs[d] = loss_of(p.detach().float(), torch.float32).item()
    start = loss_of(init, torch.float32).item()
    assert runs[torch.float32] < 0.7 * start
    assert abs(runs[dtype] - runs[torch.float32]) < 0.05 * (start - runs[torch.float32]), (start, runs)


def test_compiled_update_takes_more_variants_than_dynamos_default_limit():
    # dtype x tensor count x maximize: more compiled variants than dynamo's default of 8 per function
    for i in range(10):
        dtype = (torch.float32, torch.float64, torch.bfloat16)[i % 3]
        lists = [[torch.randn(3, dtype=dtype) for _ in range(1 + i // 3)] for _ in range(4)]
        sophia_update(*lists, lr=0.1, beta1=0.9, rho=0.1, weight_decay=0.0, eps=1e-12, maximize=i % 2 == 1,
                      implementation="compiled")
        assert all(torch.isfinite(t).all() for t in lists[0])


# -- the refresh schedule belongs to the optimizer -------------------------------------------------
def _quadratic_step(opt, p, g=None):
    p.grad = torch.ones_like(p) if g is None else g
    opt.step()
    p.grad = None


@pytest.mark.parametrize("k", [1, 3, 10])
def test_sophiag_is_due_a_refresh_after_steps_k_2k_until_one_is_folded(k):
    p = torch.nn.Parameter(torch.ones(4))
    opt = SophiaG([p], hessian_interval=k)
    due_after = []
    for step in range(1, 3 * k + 2):
        assert not (step > 1 and opt.hessian_due()), "a refresh left due before the step"
        _quadratic_step(opt, p)
        assert opt.steps == step
        if opt.hessian_due():
            due_after.append(step)
            p.grad = torch.ones_like(p)
            opt.update_hessian(bs=4)
            p.grad = None
            assert not opt.hessian_due()
    assert due_after == [s for s in range(1, 3 * k + 2) if s % k == 0]
    assert opt.hessian_updates == len(due_after)


def test_a_step_without_gradients_does_not_advance_the_clock():
    p = torch.nn.Parameter(torch.ones(2))
    opt = SophiaG([p], hessian_interval=2)
    _quadratic_step(opt, p)
    opt.step()  # no gradient anywhere: nothing updated, as torch's optimizers
    assert opt.steps == 1 and not opt.hessian_due()


def test_the_schedule_survives_a_state_dict_and_a_deepcopy():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SophiaG([p], hessian_interval=4)
    for _ in range(4):
        _quadratic_step(opt, p)
    assert opt.hessian_due()
    q = torch.nn.Parameter(torch.ones(3))
    other = SophiaG([q], hessian_interval=4)
    other.load_state_dict(opt.state_dict())
    assert other.steps == 4 and other.hessian_due()
    assert copy.deepcopy(opt).hessian_due()
    p.grad = torch.ones(3)
    opt.update_hessian(bs=2)
    other.load_state_dict(opt.state_dict())
    assert not other.hessian_due() and other.hessian_updates == 1


def test_a_state_dict_saved_before_the_optimizer_kept_its_clock_continues_the_schedule():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SophiaG([p], hessian_interval=5)
    for step in range(1, 13):
        _quadratic_step(opt, p)
        if step % 5 == 0:
            p.grad = torch.ones(3)
            opt.update_hessian(bs=2)
            p.grad = None
    old = opt.state_dict()
    for key in ("steps", "refreshed_at"):
        del old["sophia_counters"][key]
    del old["param_groups"][0]["hessian_interval"]  # as saved before SophiaG had one: the default, 10
    q = torch.nn.Parameter(torch.ones(3))
    resumed = SophiaG([q], hessian_interval=5)
    resumed.load_state_dict(old)
    assert resumed.steps == 12 and resumed.param_groups[0]["hessian_interval"] == 10
    resumed.param_groups[0]["hessian_interval"] = 5
    for _ in range(13, 16):
        _quadratic_step(resumed, q)
    assert resumed.hessian_due()  # after step 15


def test_sophiah_update_period_is_the_old_name_of_hessian_interval():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.warns(DeprecationWarning, match="hessian_interval"):
        opt = SophiaH([p], update_period=3)
    assert opt.param_groups[0]["hessian_interval"] == 3 and "update_period" not in opt.param_groups[0]
    with pytest.raises(ValueError, match="disagree"):
        SophiaH([p], update_period=3, hessian_interval=4)
    with pytest.warns(DeprecationWarning, match="hessian_interval"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "update_period": 7})
    assert opt.param_groups[1]["hessian_interval"] == 7
    # a state dict saved before the rename loads, its period kept
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["update_period"] = g.pop("hessian_interval")
    del sd["sophia_optimizer"]
    fresh = SophiaH([torch.nn.Parameter(torch.ones(3))])
    fresh.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    fresh.load_state_dict(sd)
    assert [g["hessian_interval"] for g in fresh.param_groups] == [3, 7]
    assert all("update_period" not in g for g in fresh.param_groups)
