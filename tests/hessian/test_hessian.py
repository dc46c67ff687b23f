"""Diagonal-Hessian estimators of ``sophia.hessian`` against independent expectations.

Every expectation here is computed without the code under test: exact Hessians with
``torch.autograd.functional.hessian``, exact Gauss-Newton matrices from Jacobians
(``torch.autograd.functional.jacobian``), exact moments of the probe distributions, and
hand-written clipping and EMA arithmetic. Monte-Carlo checks use seeded generators and a
tolerance of ``SIGMA`` standard errors, where the standard error comes from the sample standard
deviation of the single draws.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sophia import SophiaG
from sophia.hessian import (
    SampledLoss,
    bernoulli_sampled_loss,
    categorical_sampled_loss,
    gaussian_like,
    gaussian_sampled_loss,
    gnb_refresh,
    hutchinson,
    hutchinson_from_grads,
    probes_like,
    rademacher_like,
    sample_categorical,
    sample_categorical_from_uniform,
)

DT = torch.float64
SIGMA = 5.0  # Monte-Carlo tolerance, in standard errors
DISTRIBUTIONS = ("rademacher", "gaussian")
ESTIMATORS = ("double_backward", "forward_over_reverse", "from_grads")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors are tiny: intra-op threads only add synchronisation (10-40x slower on 2 cores).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers --------------------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat(ts) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(vec: Tensor, like) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(vec[i:i + t.numel()].view(t.shape))
        i += t.numel()
    return out


def _exact_hessian(loss_fn: Callable, params: list[Tensor]) -> Tensor:
    flat0 = _flat([p.detach() for p in params])
    return torch.autograd.functional.hessian(lambda v: loss_fn(_unflat(v, params)), flat0)


def _jacobian(out_fn: Callable, params: list[Tensor]) -> Tensor:
    """d out / d theta, shaped (*out.shape, n_params)."""
    flat0 = _flat([p.detach() for p in params])
    return torch.autograd.functional.jacobian(lambda v: out_fn(_unflat(v, params)), flat0)


def _mlp_params(gen: torch.Generator, d_in: int = 3, hidden: int = 4, d_out: int = 3) -> list[Tensor]:
    shapes = [(hidden, d_in), (hidden,), (d_out, hidden), (d_out,)]
    return [torch.randn(s, generator=gen, dtype=DT).requires_grad_() for s in shapes]


def _mlp(ps, x: Tensor) -> Tensor:
    w1, b1, w2, b2 = ps
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _linear(ps, x: Tensor) -> Tensor:
    w, b = ps
    return x @ w.T + b


def _mlp_problem():
    """Cross-entropy of a 3-4-3 tanh MLP (31 parameters) on 5 fixed examples; H by autograd."""
    g = _gen(1)
    x = torch.randn(5, 3, generator=g, dtype=DT)
    y = torch.tensor([0, 2, 1, 1, 0])
    params = _mlp_params(g)

    def loss_fn(ps):
        return F.cross_entropy(_mlp(ps, x), y)

    return loss_fn, params, _exact_hessian(loss_fn, params)


def _quadratic_problem():
    """0.5 v^T A v over two tensors (7 coordinates) with a known symmetric A.

    Coordinate 0 has no off-diagonal coupling, so its Rademacher estimate is exact every draw.
    """
    g = _gen(2)
    m = torch.randn(7, 7, generator=g, dtype=DT)
    A = m + m.T
    A[0, 1:] = 0.0
    A[1:, 0] = 0.0
    params = [torch.randn(2, 2, generator=g, dtype=DT).requires_grad_(),
              torch.randn(3, generator=g, dtype=DT).requires_grad_()]

    def loss_fn(ps):
        v = _flat(ps)
        return 0.5 * v @ A @ v

    return loss_fn, params, A


PROBLEMS = {"mlp": _mlp_problem, "quadratic": _quadratic_problem}


def _estimator(kind: str, loss_fn: Callable, params: list[Tensor]) -> Callable:
    """``f(distribution, generator, n_probes) -> list of per-parameter estimates``."""
    if kind == "from_grads":
        grads = torch.autograd.grad(loss_fn(params), params, create_graph=True)
        return lambda dist, gen, k: hutchinson_from_grads(grads, params, n_probes=k, distribution=dist,
                                                          generator=gen, retain_graph=True)
    return lambda dist, gen, k: hutchinson(loss_fn, params, n_probes=k, distribution=dist,
                                           method=kind, generator=gen)


def _exact_hutchinson_variance(H: Tensor, dist: str, n: int) -> tuple[Tensor, Tensor]:
    """Exact Var(u_i (Hu)_i), and the standard error of a sample variance over n draws.

    From the cumulants k2, k4 of X_i = u_i (Hu)_i: Var(sample variance) = k4/n + 2 k2^2/(n-1).
    Rademacher: X_i - H_ii = sum_{j!=i} H_ij w_j with w_j = u_i u_j independent signs, so
    k2 = sum_{j!=i} H_ij^2 and k4 = -2 sum_{j!=i} H_ij^4. Gaussian: X_i = u^T S_i u with
    S_i = (e_i h_i^T + h_i e_i^T) / 2, h_i = H[i], so k_r = 2^(r-1) (r-1)! tr(S_i^r).
    """
    if dist == "rademacher":
        a2 = H * H - torch.diag(H.diagonal() ** 2)
        k2, k4 = a2.sum(1), -2 * (a2 * a2).sum(1)
    else:
        eye = torch.eye(H.shape[0], dtype=H.dtype)
        S = (eye[:, :, None] * H[:, None, :] + H[:, :, None] * eye[:, None, :]) / 2
        S2 = S @ S
        k2 = 2 * S2.diagonal(dim1=1, dim2=2).sum(-1)
        k4 = 48 * (S2 @ S2).diagonal(dim1=1, dim2=2).sum(-1)
    return k2, (k4 / n + 2 * k2 * k2 / (n - 1)).clamp(min=0).sqrt()


def _within(mean: Tensor, expected: Tensor, std: Tensor, n: int, atol: float = 1e-10) -> tuple[bool, str]:
    tol = SIGMA * std / math.sqrt(n) + atol
    err = (mean - expected).abs()
    worst = int(torch.argmax(err - tol))
    msg = (f"coordinate {worst}: mean {mean[worst].item():.6g} vs expected {expected[worst].item():.6g} "
           f"(|diff| {err[worst].item():.3g} > tol {tol[worst].item():.3g}, n={n})")
    return bool((err <= tol).all()), msg


# -- probes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rademacher_like_is_plus_minus_one_with_half_frequency(dtype):
    n = 100_000
    u = rademacher_like(torch.empty(n, dtype=dtype), _gen(3))
    assert u.dtype == dtype and u.shape == (n,)
    assert ((u == 1) | (u == -1)).all(), f"values other than +-1: {u.unique().tolist()}"
    n_plus = int((u == 1).sum())
    # Binomial(n, 1/2): standard deviation sqrt(n)/2.
    assert abs(n_plus - n / 2) <= SIGMA * math.sqrt(n) / 2, f"{n_plus} of {n} entries are +1"
    assert 0 < n_plus < n, "one of the two signs never appears"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_like_has_standard_normal_moments(dtype):
    n = 100_000
    u = gaussian_like(torch.empty(4, n // 4, dtype=dtype), _gen(4))
    assert u.dtype == dtype and u.shape == (4, n // 4)
    u = u.double().reshape(-1)
    # For N(0,1): Var(u) = 1, Var(u^2) = 2, Var(u^4) = E[u^8] - E[u^4]^2 = 105 - 9 = 96.
    assert abs(u.mean().item()) <= SIGMA / math.sqrt(n), f"mean {u.mean().item()}"
    assert abs((u ** 2).mean().item() - 1) <= SIGMA * math.sqrt(2 / n), f"E[u^2] {(u ** 2).mean().item()}"
    assert abs((u ** 4).mean().item() - 3) <= SIGMA * math.sqrt(96 / n), f"E[u^4] {(u ** 4).mean().item()}"


def test_probes_like_shapes_dtypes_and_reproducibility():
    like = [torch.empty(2, 3, dtype=torch.float32), torch.empty(5, dtype=DT)]
    for dist in DISTRIBUTIONS:
        a = probes_like(like, dist, _gen(5))
        b = probes_like(like, dist, _gen(5))
        assert [(t.shape, t.dtype) for t in a] == [(t.shape, t.dtype) for t in like]
        same = all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert same, f"{dist}: same seed, different probes"


@pytest.mark.parametrize("bad", ["uniform", "Rademacher", ""])
def test_probes_like_rejects_unknown_distribution(bad):
    with pytest.raises(ValueError, match="distribution"):
        probes_like([torch.empty(3)], bad)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_probe_second_moment_is_identity(dist):
    """Jointly over two tensors (5 coordinates), the empirical E[u u^T] is I within 5 sigma."""
    like = [torch.empty(2, dtype=DT), torch.empty(3, dtype=DT)]
    m = 10_000
    gen = _gen(6)
    U = torch.stack([_flat(probes_like(like, dist, gen)) for _ in range(m)])
    S = U.T @ U / m
    off = S - torch.diag(S.diagonal())
    # Off-diagonal u_i u_j has variance 1; u_i^2 has variance 0 (Rademacher) or 2 (Gaussian).
    assert off.abs().max() <= SIGMA / math.sqrt(m), f"off-diagonal second moments\n{S}"
    diag_tol = 1e-12 if dist == "rademacher" else SIGMA * math.sqrt(2 / m)
    assert (S.diagonal() - 1).abs().max() <= diag_tol, f"diagonal second moments {S.diagonal()}"


# -- Hutchinson -----------------------------------------------------------------------------------

def test_reference_hessians_are_right():
    """The exact Hessian helper reproduces the known A of the quadratic, and is symmetric for the MLP."""
    loss_fn, params, A = _quadratic_problem()
    torch.testing.assert_close(_exact_hessian(loss_fn, params), A, rtol=1e-12, atol=1e-12)
    _, _, H = _mlp_problem()
    torch.testing.assert_close(H, H.T, rtol=1e-10, atol=1e-12)
    assert H.diagonal().abs().min() > 0 and (H - torch.diag(H.diagonal())).abs().max() > 1e-3


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("kind", ESTIMATORS)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_single_probe_estimate_is_u_times_hu(problem, kind, dist):
    """One probe gives exactly u * (H u) for the u that the generator yields (replayed)."""
    loss_fn, params, H = PROBLEMS[problem]()
    est = _estimator(kind, loss_fn, params)(dist, _gen(7), 1)
    assert [e.shape for e in est] == [p.shape for p in params]
    u = _flat(probes_like(params, dist, _gen(7)))
    torch.testing.assert_close(_flat(est), u * (H @ u), rtol=1e-9, atol=1e-12)


N_SINGLE = {"double_backward": 1000, "from_grads": 1000, "forward_over_reverse": 300}


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("kind", ESTIMATORS)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_hutchinson_mean_and_variance_match_exact(problem, kind, dist):
    """The mean of many single-probe estimates is diag(H); their variance is the exact one."""
    loss_fn, params, H = PROBLEMS[problem]()
    estimate = _estimator(kind, loss_fn, params)
    n = N_SINGLE[kind]
    gen = _gen(8)
    samples = torch.stack([_flat(estimate(dist, gen, 1)) for _ in range(n)])
    mean, std = samples.mean(0), samples.std(0)
    ok, msg = _within(mean, H.diagonal(), std, n)
    assert ok, f"{problem}/{kind}/{dist}: E[u*Hu] != diag(H): {msg}"

    # Sample variance vs the exact variance, within SIGMA exact standard errors.
    var = samples.var(0)
    exact_var, se = _exact_hutchinson_variance(H, dist, n)
    if dist == "gaussian":  # the closed forms agree: 2 H_ii^2 + sum_{j!=i} H_ij^2
        torch.testing.assert_close(exact_var, (H * H).sum(1) + H.diagonal() ** 2)
    worst = int(torch.argmax((var - exact_var).abs() - SIGMA * se))
    assert ((var - exact_var).abs() <= SIGMA * se + 1e-10).all(), (
        f"{problem}/{kind}/{dist}: coordinate {worst}: sample variance {var[worst].item():.6g}, "
        f"exact {exact_var[worst].item():.6g}, standard error {se[worst].item():.3g}")
    if problem == "quadratic" and dist == "rademacher":
        assert (samples[:, 0] == H[0, 0]).all(), "uncoupled coordinate: Rademacher estimate must be exact"


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("kind", ESTIMATORS)
def test_n_probes_averages_the_same_draws_as_repeated_calls(kind, dist):
    loss_fn, params, _ = _mlp_problem()
    estimate = _estimator(kind, loss_fn, params)
    k = 8
    gen_a, gen_b = _gen(9), _gen(9)
    averaged = _flat(estimate(dist, gen_a, k))
    singles = torch.stack([_flat(estimate(dist, gen_b, 1)) for _ in range(k)])
    torch.testing.assert_close(averaged, singles.mean(0), rtol=1e-12, atol=1e-14)
    assert torch.equal(gen_a.get_state(), gen_b.get_state()), "n_probes=K drew a different number of probes"
    assert not torch.allclose(singles[0], singles[1]), "consecutive probes were identical"


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_hutchinson_leaves_grad_untouched(method):
    loss_fn, params, _ = _mlp_problem()
    preset = torch.full_like(params[1], 3.0)
    params[1].grad = preset
    hutchinson(loss_fn, params, method=method, n_probes=2, generator=_gen(10))
    assert params[1].grad is preset and torch.equal(preset, torch.full_like(preset, 3.0))
    assert all(p.grad is None for i, p in enumerate(params) if i != 1), "hutchinson wrote into .grad"


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_hutchinson_from_grads_accepts_grad_of_backward_create_graph():
    loss_fn, params, _ = _mlp_problem()
    loss_fn(params).backward(create_graph=True)
    try:
        via_backward = hutchinson_from_grads([p.grad for p in params], params, generator=_gen(11))
    finally:
        for p in params:
            p.grad = None  # break the reference cycle the graph-carrying .grad creates
    grads = torch.autograd.grad(loss_fn(params), params, create_graph=True)
    via_grad = hutchinson_from_grads(grads, params, generator=_gen(11))
    torch.testing.assert_close(_flat(via_backward), _flat(via_grad), rtol=1e-12, atol=1e-14)


def test_hutchinson_double_backward_of_linear_loss_is_zero():
    c = torch.tensor([1.0, -2.0, 3.0], dtype=DT)
    w = torch.ones(3, dtype=DT, requires_grad=True)

    def loss_fn(ps):
        return (ps[0] * c).sum()

    zero = torch.zeros(3, dtype=DT)
    for method in ("forward_over_reverse", "double_backward"):
        torch.testing.assert_close(hutchinson(loss_fn, [w], method=method)[0], zero, rtol=0, atol=0)


def test_hutchinson_from_grads_without_graph_raises():
    loss_fn, params, _ = _mlp_problem()
    grads = torch.autograd.grad(loss_fn(params), params)  # no create_graph
    with pytest.raises(RuntimeError, match="create_graph"):
        hutchinson_from_grads(grads, params)


@pytest.mark.parametrize("kwargs", [
    {"method": "reverse_over_reverse"}, {"method": "double-backward"},
    {"n_probes": 0}, {"n_probes": -3}, {"n_probes": 2.0}, {"n_probes": True}, {"n_probes": "4"},
    {"distribution": "uniform"},
])
def test_hutchinson_rejects_bad_arguments(kwargs):
    loss_fn, params, _ = _mlp_problem()
    with pytest.raises(ValueError):
        hutchinson(loss_fn, params, **kwargs)


@pytest.mark.parametrize("kwargs", [{"n_probes": 0}, {"n_probes": 1.5}, {"distribution": "normal"}])
def test_hutchinson_from_grads_rejects_bad_arguments(kwargs):
    loss_fn, params, _ = _mlp_problem()
    grads = torch.autograd.grad(loss_fn(params), params, create_graph=True)
    with pytest.raises(ValueError):
        hutchinson_from_grads(grads, params, **kwargs)


# -- Gauss-Newton-Bartlett: exact references ------------------------------------------------------

def _gn_diag_categorical(logits: Tensor, J: Tensor) -> Tensor:
    """diag of (1/B) sum_b J_b^T (diag(p_b) - p_b p_b^T) J_b for logits (B, C), J (B, C, P)."""
    p = torch.softmax(logits.detach(), -1)
    cov = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("bcp,bcd,bdp->p", J, cov, J) / logits.shape[0]


def _gn_diag_mse(J: Tensor) -> Tensor:
    """diag of (1/n) sum_i 2 J_i^T J_i over the n output elements."""
    J = J.reshape(-1, J.shape[-1])
    return 2 * (J * J).sum(0) / J.shape[0]


def _gn_diag_bce(logits: Tensor, J: Tensor) -> Tensor:
    """diag of (1/n) sum_i s_i (1 - s_i) J_i^T J_i with s = sigmoid(logits)."""
    s = torch.sigmoid(logits.detach()).reshape(-1)
    J = J.reshape(-1, J.shape[-1])
    return (s * (1 - s))[:, None].mul(J * J).sum(0) / J.shape[0]


def _family(name: str, out: Tensor, J: Tensor):
    """(sampled-loss function of (out, generator), its n, exact GN diagonal, training loss of out)."""
    if name == "categorical":
        y = torch.arange(out.shape[0]) % out.shape[1]
        return (lambda o, g: categorical_sampled_loss(o, generator=g), out.shape[0],
                _gn_diag_categorical(out, J), lambda o: F.cross_entropy(o, y))
    target = torch.linspace(-1, 1, out.numel(), dtype=DT).view(out.shape)
    if name == "gaussian":
        return (lambda o, g: gaussian_sampled_loss(o, generator=g), out.numel(), _gn_diag_mse(J),
                lambda o: F.mse_loss(o, target))
    return (lambda o, g: bernoulli_sampled_loss(o, generator=g), out.numel(), _gn_diag_bce(out, J),
            lambda o: F.binary_cross_entropy_with_logits(o, (target > 0).to(DT)))


FAMILIES = ("categorical", "gaussian", "bernoulli")
D_OUT = {"categorical": 3, "gaussian": 2, "bernoulli": 2}


@pytest.mark.parametrize("family", FAMILIES)
def test_gauss_newton_reference_equals_hessian_of_linear_model(family):
    """For outputs linear in theta the Gauss-Newton matrix is the Hessian: checks the references."""
    g = _gen(12)
    x = torch.randn(4, 3, generator=g, dtype=DT)
    params = [torch.randn(D_OUT[family], 3, generator=g, dtype=DT), torch.randn(D_OUT[family], generator=g,
                                                                                dtype=DT)]
    out = _linear(params, x)
    _, _, gn, train_loss = _family(family, out, _jacobian(lambda ps: _linear(ps, x), params))
    H = _exact_hessian(lambda ps: train_loss(_linear(ps, x)), params)
    torch.testing.assert_close(gn, H.diagonal(), rtol=1e-10, atol=1e-12)


def _gnb_samples(sampled_fn: Callable, out: Tensor, params: list[Tensor], n_expected: int,
                 m: int, seed: int) -> tuple[Tensor, Tensor]:
    """m draws of (g_hat, n * g_hat**2), flattened over the parameters."""
    gen = _gen(seed)
    gs = []
    for _ in range(m):
        s = sampled_fn(out, gen)
        assert isinstance(s, SampledLoss) and s.n == n_expected, f"got {s!r:.80}, expected n={n_expected}"
        gs.append(_flat(torch.autograd.grad(s.loss, params, retain_graph=True)))
    g = torch.stack(gs)
    return g, n_expected * g * g


N_GNB = 3000


@pytest.mark.parametrize("family", FAMILIES)
def test_gnb_expectation_is_gauss_newton_diagonal(family):
    g = _gen(13)
    x = torch.randn(5, 3, generator=g, dtype=DT)
    params = _mlp_params(g, d_out=D_OUT[family])
    out = _mlp(params, x)
    sampled_fn, n, gn, _ = _family(family, out, _jacobian(lambda ps: _mlp(ps, x), params))
    assert gn.min() > 0
    grads, est = _gnb_samples(sampled_fn, out, params, n, N_GNB, seed=14)
    ok, msg = _within(est.mean(0), gn, est.std(0), N_GNB, atol=1e-12)
    assert ok, f"{family}: E[n g^2] != diag(GN): {msg}"
    # Labels drawn from the model: the sampled-label gradient has mean zero.
    ok, msg = _within(grads.mean(0), torch.zeros_like(gn), grads.std(0), N_GNB, atol=1e-12)
    assert ok, f"{family}: E[g] != 0: {msg}"


def _masked_problem():
    g = _gen(15)
    x = torch.randn(3, 4, 2, generator=g, dtype=DT)  # (B, T, d_in)
    params = _mlp_params(g, d_in=2, hidden=3, d_out=4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    return x, params, mask


def test_categorical_mask_counts_and_excludes_positions():
    x, params, mask = _masked_problem()
    logits = _mlp(params, x).detach().requires_grad_()
    s = categorical_sampled_loss(logits, mask=mask, generator=_gen(16))
    assert s.n == int(mask.sum()) == 7
    (dlogits,) = torch.autograd.grad(s.loss, logits)
    assert (dlogits[~mask] == 0).all(), "masked positions contribute to the sampled loss"
    assert (dlogits[mask].abs().sum(-1) > 0).all(), "a kept position does not contribute"
    labels = sample_categorical(logits, _gen(16))  # replay: labels are drawn for every position
    torch.testing.assert_close(s.loss, F.cross_entropy(logits[mask], labels[mask]), rtol=1e-12, atol=0)


def test_categorical_masked_gnb_expectation_counts_kept_positions_only():
    x, params, mask = _masked_problem()
    out = _mlp(params, x)
    J = _jacobian(lambda ps: _mlp(ps, x), params)  # (B, T, C, P)
    gn = _gn_diag_categorical(out[mask], J[mask])  # mean over the 7 kept positions
    _, est = _gnb_samples(lambda o, g: categorical_sampled_loss(o, mask=mask, generator=g), out, params,
                          7, N_GNB, seed=17)
    ok, msg = _within(est.mean(0), gn, est.std(0), N_GNB, atol=1e-12)
    assert ok, f"masked categorical: E[n g^2] != diag(GN over kept positions): {msg}"


@pytest.mark.parametrize("logits, mask, match", [
    (torch.zeros(4, 1), None, "class dimension"),
    (torch.zeros(3, 4, 5), torch.ones(3, 5, dtype=torch.bool), "mask"),
    (torch.zeros(3, 4, 5), torch.zeros(3, 4, dtype=torch.bool), "keeps nothing"),
])
def test_categorical_sampled_loss_rejects_bad_input(logits, mask, match):
    with pytest.raises(ValueError, match=match):
        categorical_sampled_loss(logits, mask=mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_losses_are_reproducible_with_a_generator(family):
    out = torch.randn(200, 5, generator=_gen(18), dtype=DT)
    fn = {"categorical": lambda g: categorical_sampled_loss(out, generator=g),
          "gaussian": lambda g: gaussian_sampled_loss(out, generator=g),
          "bernoulli": lambda g: bernoulli_sampled_loss(out, generator=g)}[family]
    a, b, c = fn(_gen(19)), fn(_gen(19)), fn(_gen(20))
    assert torch.equal(a.loss, b.loss) and a.n == b.n, "same seed, different sampled loss"
    assert not torch.equal(a.loss, c.loss), "different seeds, same sampled loss"


def test_sample_categorical_reproducible_and_shaped():
    logits = torch.randn(2, 50, 6, generator=_gen(21), dtype=DT)
    a, b, c = (sample_categorical(logits, _gen(s)) for s in (22, 22, 23))
    assert a.shape == (2, 50) and a.dtype == torch.int64
    assert torch.equal(a, b), "same seed, different labels"
    assert not torch.equal(a, c), "different seeds, same labels"
    assert a.min() >= 0 and a.max() < 6


def test_sample_categorical_frequencies_match_softmax():
    base = torch.tensor([1.0, -0.5, 0.3, 2.0, -math.inf], dtype=DT)
    n = 40_000
    labels = sample_categorical(base.expand(n, -1), _gen(24))
    counts = torch.bincount(labels, minlength=5).double()
    p = torch.softmax(base, -1)
    sd = (n * p * (1 - p)).sqrt()
    assert counts[4] == 0, "a class of probability 0 was drawn"
    assert ((counts - n * p).abs() <= SIGMA * sd).all(), (
        f"counts {counts.tolist()} vs expected {(n * p).tolist()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_inverse_cdf_labels_are_the_first_class_past_u(dtype):
    """Against a float64 reference: the label is the first class whose cumulative softmax exceeds u * total,
    for random rows, for u at the ends of [0, 1), and with classes of probability 0 at the start, middle and
    end (never drawn, even at u = 0 or u just below 1)."""
    logits = torch.randn(64, 9, generator=_gen(40), dtype=DT) * 3
    logits[:16, 0] = -math.inf
    logits[16:32, 4] = -math.inf
    logits[32:48, 8] = -math.inf
    u = torch.rand(64, generator=_gen(41), dtype=DT)
    u[::8], u[1::8], u[2::8] = 0.0, 1.0 - 2.0 ** -24, 1.0  # u = 1 (outside [0, 1)) must still be safe
    cdf = torch.softmax(logits.to(dtype).double(), -1).cumsum(-1)
    # the first class past u * total, or the last class of nonzero probability when u = 1
    last = torch.isfinite(logits).long().cumsum(-1).argmax(-1)
    want = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1).clamp_max(8)
    want = torch.where(u >= 1.0, last, want)
    got = sample_categorical_from_uniform(logits.to(dtype), u.float())
    assert got.dtype == torch.int64 and got.shape == (64,)
    # float32 cumulative sums may move a u that lies within rounding of a boundary to the neighbouring class
    close = (cdf - (u * cdf[:, -1]).unsqueeze(-1)).abs().min(-1).values < 1e-6
    assert torch.equal(got[~close], want[~close]), (got - want).nonzero()
    assert torch.isfinite(logits.gather(1, got.unsqueeze(1))).all(), "a class of probability 0 was drawn"


def test_inverse_cdf_sampler_rejects_bad_shapes():
    with pytest.raises(ValueError, match="u of shape"):
        sample_categorical_from_uniform(torch.zeros(3, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="class dimension"):
        sample_categorical_from_uniform(torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(ValueError, match="float32 or float64"):
        sample_categorical_from_uniform(torch.zeros(3, 4), torch.zeros(3, dtype=torch.bfloat16))


def test_inverse_cdf_sampler_compiles_to_the_same_labels():
    """The harness draws labels inside torch.compile'd forwards: same labels as eager."""
    logits = torch.randn(4, 32, 50, generator=_gen(42))
    u = torch.rand(4, 32, generator=_gen(43))
    compiled = torch.compile(sample_categorical_from_uniform, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(logits, u), sample_categorical_from_uniform(logits, u))


# -- gnb_refresh with SophiaG ---------------------------------------------------------------------

BETAS = (0.9, 0.95)


def _refresh_setup():
    torch.manual_seed(25)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(6, 3, generator=_gen(26), dtype=DT)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    opt = SophiaG(model.parameters(), lr=0.1, betas=BETAS)
    return model, x, y, opt


def _sampled_grad(model: nn.Module, x: Tensor, seed: int) -> list[Tensor]:
    s = categorical_sampled_loss(model(x), generator=_gen(seed))
    return list(torch.autograd.grad(s.loss, list(model.parameters())))


def test_gnb_refresh_folds_n_g_squared_and_restores_grads():
    model, x, y, opt = _refresh_setup()
    params = list(model.parameters())
    F.cross_entropy(model(x), y).backward()  # a pending training gradient ...
    params[3].grad = None  # ... except for one parameter
    pending = [p.grad for p in params]
    pending_values = [None if g is None else g.clone() for g in pending]
    before = [p.detach().clone() for p in params]

    n = gnb_refresh(opt, lambda: categorical_sampled_loss(model(x), generator=_gen(27)))

    assert n == 6
    g_hat = _sampled_grad(model, x, seed=27)
    for i, (p, g) in enumerate(zip(params, g_hat, strict=True)):
        expected = (1 - BETAS[1]) * n * g * g
        assert expected.abs().max() > 0
        torch.testing.assert_close(opt.state[p]["hessian"], expected, rtol=1e-12, atol=0,
                                   msg=lambda m, i=i: f"parameter {i}: {m}")
        assert torch.equal(p, before[i]), f"parameter {i} changed: gnb_refresh must not step"
    for i, (p, g, v) in enumerate(zip(params, pending, pending_values, strict=True)):
        if g is None:
            assert p.grad is None, f"parameter {i} had no grad before, has one after"
        else:
            assert p.grad is g and torch.equal(p.grad, v), f"parameter {i}: pending gradient not restored"

    # A second refresh is an EMA step: h = b2 * h + (1 - b2) * n * g^2.
    h1 = [opt.state[p]["hessian"].clone() for p in params]
    gnb_refresh(opt, lambda: categorical_sampled_loss(model(x), generator=_gen(28)))
    for p, h, g in zip(params, h1, _sampled_grad(model, x, seed=28), strict=True):
        torch.testing.assert_close(opt.state[p]["hessian"], BETAS[1] * h + (1 - BETAS[1]) * n * g * g,
                                   rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])
def test_gnb_refresh_clips_sampled_gradient_before_squaring(max_norm):
    model, x, _, opt = _refresh_setup()
    params = list(model.parameters())
    n = gnb_refresh(opt, lambda: categorical_sampled_loss(model(x), generator=_gen(29)),
                    max_grad_norm=max_norm)
    g_hat = _sampled_grad(model, x, seed=29)
    norm = _flat(g_hat).norm().item()
    assert norm > 0.01, "the test needs a gradient norm well above torch's 1e-6 clipping slack"
    coef = min(1.0, max_norm / norm)
    for i, (p, g) in enumerate(zip(params, g_hat, strict=True)):
        torch.testing.assert_close(opt.state[p]["hessian"], (1 - BETAS[1]) * n * (coef * g) ** 2,
                                   rtol=1e-4, atol=0, msg=lambda m, i=i: f"parameter {i}: {m}")
    for p in params:
        assert p.grad is None


@pytest.mark.parametrize("bad_return", ["tuple", "tensor"])
def test_gnb_refresh_rejects_non_sampled_loss_and_restores(bad_return):
    model, x, y, opt = _refresh_setup()
    F.cross_entropy(model(x), y).backward()
    pending = [p.grad for p in model.parameters()]

    def fn():
        s = categorical_sampled_loss(model(x))
        return (s.loss, s.n) if bad_return == "tuple" else s.loss

    with pytest.raises(TypeError, match="SampledLoss"):
        gnb_refresh(opt, fn)
    restored = all(p.grad is g for p, g in zip(model.parameters(), pending, strict=True))
    assert restored, "pending grads not restored after the error"
    assert all(not s for s in opt.state.values()) and opt.diagnostics()["hessian_updates"] == 0


# -- gnb_refresh under DistributedDataParallel (2 processes, gloo, CPU) ----------------------------

DDP_BATCH = 8


def _ddp_problem():
    """Model, full batch, training labels and full-batch sampled labels: identical in every process."""
    torch.manual_seed(30)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    x = torch.randn(DDP_BATCH, 3, generator=_gen(31), dtype=DT)
    y_train = torch.arange(DDP_BATCH) % 4
    with torch.no_grad():
        labels = sample_categorical(model(x), _gen(32))
    return model, x, y_train, labels


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, x, y_train, labels = _ddp_problem()
        ddp = DistributedDataParallel(model)
        opt = SophiaG(ddp.parameters(), betas=BETAS)
        half = DDP_BATCH // world
        mine = slice(rank * half, (rank + 1) * half)
        F.cross_entropy(ddp(x[mine]), y_train[mine]).backward()  # pending training gradient
        pending = [p.grad for p in model.parameters()]
        pending_values = [g.clone() for g in pending]
        n = gnb_refresh(opt, lambda: SampledLoss(F.cross_entropy(ddp(x[mine]), labels[mine]), half))
        restored = all(p.grad is g and torch.equal(g, v)
                       for p, g, v in zip(model.parameters(), pending, pending_values, strict=True))
        torch.save({"n": n, "restored": restored,
                    "hessian": [opt.state[p]["hessian"] for p in model.parameters()]}, out_file)
    finally:
        dist.destroy_process_group()


def test_gnb_refresh_under_ddp_matches_single_process_full_batch():
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        outs = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "ddp-worker", str(r),
                                   str(world), init_file, outs[r]],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(world)]
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=120)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                pytest.fail("DDP workers timed out")
        for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
            assert p.returncode == 0, f"rank {r} failed (exit {p.returncode}):\n{log[-3000:]}"
        results = [torch.load(o) for o in outs]

    model, x, _, labels = _ddp_problem()
    g = torch.autograd.grad(F.cross_entropy(model(x), labels), list(model.parameters()))
    for r, res in enumerate(results):
        assert res["n"] == DDP_BATCH, f"rank {r}: n={res['n']}, expected the global batch {DDP_BATCH}"
        assert res["restored"], f"rank {r}: pending training gradients not restored"
        for i, (h, gi) in enumerate(zip(res["hessian"], g, strict=True)):
            torch.testing.assert_close(h, (1 - BETAS[1]) * DDP_BATCH * gi * gi, rtol=1e-10, atol=1e-15,
                                       msg=lambda m, r=r, i=i: f"rank {r}, parameter {i}: {m}")


if __name__ == "__main__" and sys.argv[1:2] == ["ddp-worker"]:
    _ddp_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
