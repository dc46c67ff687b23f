"""A refused optimizer call changes nothing; bad input to the optimizers and estimators gets a
clear error, checked before anything is touched."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sophia import SophiaG, SophiaH
from sophia.hessian import hutchinson, hutchinson_from_grads

OPTIMIZERS = [SophiaG, SophiaH]


def _trained(cls, shapes=((3, 2), (4,)), steps=3, seed=0, **kwargs):
    """An optimizer with non-trivial state after a few steps on fixed gradients."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    opt = cls(params, lr=0.01, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
        opt.update_hessian(estimates=[torch.rand(p.shape, generator=g, dtype=torch.float64) for p in params])
    return opt, params


def _snapshot(opt):
    groups = [{k: v for k, v in grp.items() if k != "params"} for grp in opt.param_groups]
    params = [[id(p) for p in grp["params"]] for grp in opt.param_groups]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return copy.deepcopy(groups), params, state, opt.hessian_updates, opt.hessian_skipped


def _assert_unchanged(opt, snap):
    groups, params, state, updates, skipped = _snapshot(opt)
    assert groups == snap[0] and params == snap[1] and (updates, skipped) == snap[3:]
    assert state.keys() == snap[2].keys()
    for key, s in state.items():
        assert s.keys() == snap[2][key].keys()
        for name, t in s.items():
            assert torch.equal(t, snap[2][key][name]), name


def _continue(opt, params, seed=7, steps=3):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
    return [p.detach().clone() for p in params]


# -- add_param_group ---------------------------------------------------------------------------
BAD_GROUPS = [
    ("lr", dict(lr=-1.0)), ("lr", dict(lr=math.nan)), ("rho", dict(rho=-0.5)),
    ("betas", dict(betas=(0.9, 1.0))), ("foreach", dict(foreach="yes")),
    ("cuda_graph", dict(cuda_graph=True)),  # the parameters are on the CPU
]


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("name,bad", BAD_GROUPS, ids=[n for n, _ in BAD_GROUPS])
def test_refused_param_group_is_not_added_and_never_stepped(cls, name, bad):
    opt, params = _trained(cls)
    snap = _snapshot(opt)
    extra = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [extra], **bad})
    _assert_unchanged(opt, snap)
    extra.grad = torch.ones(5, dtype=torch.float64)  # with lr = -1 kept, this step would ascend
    twin, twin_params = _trained(cls)
    assert all(torch.equal(a, b) for a, b in zip(_continue(opt, params), _continue(twin, twin_params)))
    assert torch.equal(extra.detach(), torch.ones(5, dtype=torch.float64)) and extra not in opt.state


def test_sophiah_refused_hessian_interval_is_not_added():
    opt, _ = _trained(SophiaH)
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match="hessian_interval"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "hessian_interval": 0})
    _assert_unchanged(opt, snap)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_param_group_from_a_generator_is_added_whole(cls):
    opt, _ = _trained(cls)
    extra = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    opt.add_param_group({"params": (p for p in extra), "lr": 0.5})
    assert opt.param_groups[-1]["params"] == extra and opt.param_groups[-1]["lr"] == 0.5


# -- construction ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_multi_element_tensor_lr_is_refused_before_params_are_read(cls):
    # torch's generic optimizer suite (TestOptimRenewed) passes params=None here
    with pytest.raises(ValueError, match="lr"):
        cls(None, lr=torch.tensor([1e-3, 1e-3]))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_one_element_tensor_lr_steps_like_the_float(cls):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    a.grad, b.grad = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([1.0, -2.0, 0.0])
    cls([a], lr=torch.tensor(0.1), weight_decay=0.0).step()
    cls([b], lr=0.1, weight_decay=0.0).step()
    assert torch.equal(a.detach(), b.detach())
    torch.testing.assert_close(a.detach(), torch.tensor([0.9, 1.1, 1.0]), rtol=0, atol=1e-7)  # sign steps while h = 0


@pytest.mark.parametrize("flag", ["foreach", "fused"])
def test_performance_flags_must_be_bool_or_none(flag):
    with pytest.raises(ValueError, match=flag):
        SophiaG([torch.nn.Parameter(torch.ones(2))], **{flag: "no"})


def test_sophiah_generator_must_be_a_generator():
    with pytest.raises(ValueError, match="generator"):
        SophiaH([torch.nn.Parameter(torch.ones(2))], generator=0)


# -- load_state_dict ---------------------------------------------------------------------------
def _edited(sd, **group):
    sd = copy.deepcopy(sd)
    sd["param_groups"][0].update(group)
    return sd


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("name,bad", [("lr", dict(lr=math.nan)), ("rho", dict(rho=-1.0)),
                                      ("maximize", dict(maximize="yes"))])
def test_state_dict_with_invalid_setting_is_refused_and_nothing_changes(cls, name, bad):
    source, _ = _trained(cls, seed=1, steps=5)
    opt, params = _trained(cls)
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=name):
        opt.load_state_dict(_edited(source.state_dict(), **bad))
    _assert_unchanged(opt, snap)
    twin, twin_params = _trained(cls)
    assert all(torch.equal(a, b) for a, b in zip(_continue(opt, params), _continue(twin, twin_params)))


def test_sophiah_state_dict_with_invalid_hessian_interval_is_refused_and_nothing_changes():
    source, _ = _trained(SophiaH, seed=1)
    opt, _ = _trained(SophiaH)
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match="hessian_interval"):
        opt.load_state_dict(_edited(source.state_dict(), hessian_interval=0))
    _assert_unchanged(opt, snap)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_adamw_state_dict_is_named_as_foreign_and_the_optimizer_still_steps(cls):
    opt, params = _trained(cls)
    adam_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    adamw = torch.optim.AdamW(adam_params)
    for p in adam_params:
        p.grad = torch.ones_like(p)
    adamw.step()
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=r"another optimizer \(torch.optim.AdamW's\).*lack 'rho'") as e:
        opt.load_state_dict(adamw.state_dict())
    assert "KeyError" not in repr(e.value)
    _assert_unchanged(opt, snap)
    twin, twin_params = _trained(cls)
    assert all(torch.equal(a, b) for a, b in zip(_continue(opt, params), _continue(twin, twin_params)))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_state_dict_for_other_shapes_is_refused_at_load(cls):
    other, _ = _trained(cls, shapes=((2, 3), (4,)))  # same number of elements, another shape
    opt, params = _trained(cls)
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*shape \(3, 2\)"):
        opt.load_state_dict(other.state_dict())
    _assert_unchanged(opt, snap)
    _continue(opt, params)  # still steps


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("edit", ["groups", "params", "counter", "step", "not a dict"])
def test_malformed_state_dict_is_refused_and_nothing_changes(cls, edit):
    source, _ = _trained(cls, seed=1)
    sd = copy.deepcopy(source.state_dict())
    if edit == "groups":
        sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))
    elif edit == "params":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:1]
    elif edit == "counter":
        sd["sophia_counters"]["hessian_updates"] = -3
    elif edit == "step":
        sd["state"][0]["step"] = torch.tensor(math.nan)
    else:
        sd = [sd]
    opt, _ = _trained(cls)
    snap = _snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, snap)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_valid_state_dict_still_loads_with_its_counters(cls):
    source, _ = _trained(cls, seed=1, steps=4)
    opt, _ = _trained(cls)
    opt.load_state_dict(source.state_dict())
    assert opt.hessian_updates == source.hessian_updates == 4
    for p, q in zip(opt.param_groups[0]["params"], source.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["hessian"], source.state[q]["hessian"])


# -- update_hessian(bs=N) without gradients -----------------------------------------------------
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_gnb_refresh_without_gradients_raises_and_counts_nothing(cls):
    opt, _ = _trained(cls)
    opt.zero_grad(set_to_none=True)
    snap = _snapshot(opt)
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.update_hessian(bs=64)
    _assert_unchanged(opt, snap)
    assert opt.diagnostics()["hessian_updates"] == 3


# -- hutchinson: what loss_fn returns ------------------------------------------------------------
METHODS = ["double_backward", "forward_over_reverse"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("loss,error,match", [
    (lambda ps: ps[0] ** 2, ValueError, r"scalar loss, got a tensor of shape \(3,\)"),
    (lambda ps: 1.5, TypeError, "got float"),
    (lambda ps: None, TypeError, "got NoneType"),
], ids=["vector", "float", "none"])
def test_hutchinson_says_what_is_wrong_with_the_loss(method, loss, error, match):
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(error, match=match):
        hutchinson(loss, [w], method=method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("loss", [
    lambda ps: torch.tensor(2.0, dtype=torch.float64),  # a constant
    lambda ps: (ps[0].detach() ** 2).sum(),  # computed from the values, not through the parameter
], ids=["constant", "detached"])
def test_hutchinson_of_a_loss_that_ignores_the_parameters_is_zero(method, loss):
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    (est,) = hutchinson(loss, [w], method=method)
    assert torch.equal(est, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("method", METHODS)
def test_hutchinson_accepts_a_one_element_loss(method):
    # loss = sum(c * w^2): H = diag(2c), and u * (H u) = 2c for Rademacher u
    c = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    (est,) = hutchinson(lambda ps: (c * ps[0] ** 2).sum().reshape(1, 1), [w], method=method)
    assert torch.equal(est, 2 * c)


def test_hutchinson_from_grads_refuses_a_count_mismatch():
    w = torch.ones(3, requires_grad=True)
    (g,) = torch.autograd.grad((w ** 3).sum(), [w], create_graph=True)
    with pytest.raises(ValueError, match="1 gradients for 2 parameters"):
        hutchinson_from_grads([g], [w, torch.ones(2, requires_grad=True)])


# -- gnb_refresh: its clipping threshold -------------------------------------------------------
@pytest.mark.parametrize("bad", [-1.0, 0.0, math.nan, math.inf, "1"])
def test_gnb_refresh_refuses_a_bad_max_grad_norm_before_touching_anything(bad):
    from sophia.hessian import categorical_sampled_loss, gnb_refresh

    model = torch.nn.Linear(3, 4)
    opt = SophiaG(model.parameters())
    pending = [torch.full_like(p, 0.5) for p in model.parameters()]
    for p, g in zip(model.parameters(), pending):
        p.grad = g
    with pytest.raises(ValueError, match="max_grad_norm"):
        gnb_refresh(opt, lambda: categorical_sampled_loss(model(torch.randn(8, 3))), max_grad_norm=bad)
    assert all(p.grad is g for p, g in zip(model.parameters(), pending))
    assert opt.hessian_updates == 0 and len(opt.state) == 0


# -- the other Sophia's state dict --------------------------------------------------------------
@pytest.mark.parametrize("source_cls,target_cls", [(SophiaH, SophiaG), (SophiaG, SophiaH)])
@pytest.mark.parametrize("marked", [True, False], ids=["saved-now", "saved-before-the-class-was-recorded"])
def test_sophiag_and_sophiah_refuse_each_others_state_dicts(source_cls, target_cls, marked):
    source, _ = _trained(source_cls, seed=1, steps=4)
    sd = source.state_dict()
    if not marked:
        del sd["sophia_optimizer"]
    opt, params = _trained(target_cls)
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=f"saved by {source_cls.__name__}.*Nothing was changed"):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, snap)
    assert all("distribution" not in g for g in opt.param_groups) == (target_cls is SophiaG)
    twin, twin_params = _trained(target_cls)
    assert all(torch.equal(a, b) for a, b in zip(_continue(opt, params), _continue(twin, twin_params)))


def test_a_subclass_loads_its_familys_state_dicts():
    class Mine(SophiaG):
        pass

    source, _ = _trained(SophiaG, seed=1, steps=4)
    opt, _ = _trained(Mine)
    opt.load_state_dict(source.state_dict())
    assert opt.hessian_updates == 4 and opt.state_dict()["sophia_optimizer"] == "SophiaG"


# -- a refused step changes nothing ----------------------------------------------------------------
def _two_groups_after_a_step(cls):
    g = torch.Generator().manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))]} for _ in range(2)]
    opt = cls(groups, lr=0.01)
    for grp in groups:
        grp["params"][0].grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    return opt, groups


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("name,bad", [("lr", dict(lr="0.1")), ("betas", dict(betas=(0.9,))),
                                      ("rho", dict(rho=-1.0)), ("eps", dict(eps=0.0))])
def test_a_setting_corrupted_after_construction_fails_the_step_before_anything_changes(cls, name, bad):
    opt, groups = _two_groups_after_a_step(cls)
    opt.param_groups[1].update(bad)  # the second group: the first must not have moved when it is refused
    snap = _snapshot(opt)
    before = [grp["params"][0].detach().clone() for grp in groups]
    with pytest.raises(ValueError, match=name):
        opt.step()
    _assert_unchanged(opt, snap)
    assert all(torch.equal(b, grp["params"][0]) for b, grp in zip(before, groups))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_multi_element_tensor_lr_uses_torchs_wording(cls):
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        cls([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor([1e-3, 1e-3]))


# -- copies ----------------------------------------------------------------------------------------
def _roundtrips():
    import io
    import pickle

    def via_torch_save(opt):
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o)), "torch.save": via_torch_save}


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "trained"])
def test_copies_of_the_optimizer_keep_counters_and_continue_like_the_original(cls, how, fresh):
    extra = dict(generator=torch.Generator().manual_seed(3), hessian_interval=2) if cls is SophiaH else {}
    opt, params = _trained(cls, steps=0 if fresh else 4, **extra)
    clone = _roundtrips()[how]((opt, params))
    copy_opt, copy_params = clone
    assert copy_opt.hessian_updates == opt.hessian_updates and copy_opt.hessian_skipped == opt.hessian_skipped
    assert copy_opt.state_dict()["sophia_counters"] == opt.state_dict()["sophia_counters"]
    copy_opt.diagnostics()
    if cls is SophiaH:  # the probes' generator travels with the copy, in the same state
        assert copy_opt.generator is not None
        assert torch.equal(copy_opt.generator.get_state(), opt.generator.get_state())

    def go(o, ps):  # steps that refresh (SophiaH draws probes from its generator) and fold estimates
        g = torch.Generator().manual_seed(11)
        for _ in range(4):
            for p in ps:
                p.grad = None
            loss = sum((p ** 3).sum() + (torch.randn(p.shape, generator=g, dtype=p.dtype) * p).sum() for p in ps)
            loss.backward(create_graph=cls is SophiaH)
            o.step()
            o.zero_grad(set_to_none=True)
            if cls is SophiaG:
                sum((p ** 2).sum() for p in ps).backward()
                o.update_hessian(bs=8)
                o.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in ps], o.hessian_updates

    a, b = go(opt, params), go(copy_opt, copy_params)
    assert a[1] == b[1] and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


# -- messages that name the real problem -----------------------------------------------------------
def test_sophiah_on_a_linear_loss_with_create_graph_does_not_blame_create_graph_alone():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SophiaH([p], hessian_interval=1)
    for _ in range(2):
        (p * torch.tensor([1.0, 2.0, 3.0])).sum().backward(create_graph=True)  # the user did pass it
        if opt.hessian_due():
            with pytest.raises(RuntimeError, match="linear in these parameters") as e:
                opt.step()
            assert "Nothing was changed" in str(e.value)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)


def test_integer_logits_are_refused_by_name():
    from sophia.hessian import categorical_sampled_loss

    with pytest.raises(ValueError, match="logits must be floating point.*int64"):
        categorical_sampled_loss(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("form", ["bs", "estimates"])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_setting_corrupted_after_construction_fails_the_refresh_before_anything_changes(cls, form):
    opt, groups = _two_groups_after_a_step(cls)
    opt.param_groups[1]["betas"] = (0.9, 1.5)
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match="betas"):
        if form == "bs":
            opt.update_hessian(bs=4)
        else:
            opt.update_hessian(estimates=[torch.ones(3, dtype=torch.float64)] * 2)
    _assert_unchanged(opt, snap)


# -- the C++ CPU kernel's build ------------------------------------------------------------------
@pytest.mark.slow
def test_a_kernel_build_killed_midway_does_not_block_later_ones(tmp_path):
    # A killed build leaves torch's lock file (on which torch's builder would wait forever) and a partial
    # library; the next processes, two at once here, must clean up, build once and load it.
    import os
    import subprocess
    import sys

    from sophia.optim import cpu_kernel

    missing = cpu_kernel._missing_tool()
    if missing is not None:
        pytest.skip(f"cannot build the C++ CPU kernel here: {missing}")
    directory = tmp_path / f"sophia_lab_cpu_{cpu_kernel._digest()}"
    directory.mkdir()
    (directory / "lock").write_text("")
    (directory / f"{directory.name}.so").write_bytes(b"\x7fELF, cut short")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from sophia.optim import cpu_kernel\n"
            "assert cpu_kernel.available(), cpu_kernel.unavailable_reason()\n"
            "print(cpu_kernel.kernel_info())\n")
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, err[-2000:]
        assert out.strip()
    assert (directory / "built").exists() and not (directory / "lock").exists()
