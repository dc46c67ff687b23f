"""``sophia bench toy``: the problems' derivatives against autograd, the methods against closed forms,
and the quick mode end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sophia.bench.toy import Problem, problem_2d, problem_logistic, problem_mlp, run_method
from sophia.cli import main


@pytest.mark.parametrize("make", [problem_2d, problem_logistic])
def test_gradient_and_hessian_match_autograd(make):
    p = make()
    gen = torch.Generator().manual_seed(1)
    theta = p.theta0 + 0.3 * torch.randn(p.theta0.shape, dtype=torch.float64, generator=gen)
    grad, hdiag, H = p.derivatives(theta)
    exact = torch.autograd.functional.hessian(p.loss, theta)
    torch.testing.assert_close(grad, torch.func.grad(p.loss)(theta))
    torch.testing.assert_close(H, exact)
    torch.testing.assert_close(hdiag, torch.diagonal(exact))


def test_mlp_gauss_newton_is_the_hessian_without_the_residual_term():
    p = problem_mlp()
    theta = p.theta0.clone()
    grad, hdiag, GN = p.derivatives(theta)
    torch.testing.assert_close(grad, torch.func.grad(p.loss)(theta))
    assert torch.linalg.eigvalsh(GN).min() > -1e-10  # positive semi-definite, unlike the Hessian here
    assert torch.linalg.eigvalsh(torch.autograd.functional.hessian(p.loss, theta)).min() < 0
    torch.testing.assert_close(hdiag, torch.diagonal(GN))


def _quadratic(a: float, x0: float, tol: float) -> Problem:
    def derivatives(t):
        return a * t, torch.full_like(t, a), torch.diag(torch.full_like(t, a))

    return Problem("q", "0.5 a x^2", torch.tensor([x0], dtype=torch.float64), lambda t: 0.5 * a * (t ** 2).sum(),
                   derivatives, 0.0, tol)


def test_gradient_descent_takes_the_closed_form_number_of_steps():
    a, x0, lr, tol = 2.0, 3.0, 0.1, 1e-8
    # gap after t steps: 0.5 a x0^2 (1 - lr a)^(2t)
    expected = math.ceil(math.log(tol / (0.5 * a * x0 ** 2)) / (2 * math.log(1 - lr * a)))
    assert run_method(_quadratic(a, x0, tol), "GD", lr, 1000)["steps_to_tol"] == expected


def test_idealised_sophia_is_newton_inside_the_clip_and_sign_descent_outside():
    a, x0, tol = 50.0, 1.5, 1e-20
    # the first step is clipped to lr = 1 (Newton would move 1.5), the second is the Newton step to 0
    r = run_method(_quadratic(a, x0, tol), "SophiaG", 1.0, 10)
    assert r["losses"][1] == pytest.approx(0.5 * a * 0.5 ** 2)
    assert r["steps_to_tol"] == 2
    assert run_method(_quadratic(a, x0, tol), "Newton", 1.0, 10)["steps_to_tol"] == 1


def test_quick_toy_writes_report_results_and_plots(tmp_path, capsys):
    assert main(["bench", "toy", "--quick", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert [p["problem"] for p in result["problems"]] == ["2d", "logistic", "mlp"]
    for p in result["problems"]:
        assert set(p["best"]) == {"GD", "Adam", "SignGD", "Newton", "SophiaG"}
    logistic = result["problems"][1]["best"]
    assert logistic["Newton"]["steps_to_tol"] is not None  # convex: Newton converges
    for png in ("toy_2d_trajectories.png", "toy_losses.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "report.md").read_text()
    assert "| SophiaG |" in report and "Command: `sophia bench toy --quick" in report
