"""``sophia bench toy``: where second-order information matters, on problems small enough to see.

Three full-batch problems in float64, each with its exact gradient and curvature:

* ``2d``: L(x, y) = 25 log cosh(x - 1) + 0.005 (y + 1)^2. The curvatures at the minimum differ
  2,500-fold, and the sharp one (log cosh) flattens away from it, where pure Newton overshoots;
* ``logistic``: L2-regularised logistic regression on generated features whose scales span three
  orders of magnitude (convex; the Gauss-Newton diagonal is its exact Hessian diagonal);
* ``mlp``: a one-hidden-layer tanh network fitted to a teacher of the same shape (non-convex,
  the minimum value 0 is attainable).

Methods: gradient descent, Adam (torch.optim.Adam, betas 0.9/0.999), sign descent, Newton (the
full Hessian, step 1; Gauss-Newton for the network, whose Hessian is indefinite) and SophiaG,
idealised: this library's optimizer fed the exact curvature diagonal every step (the Hessian for 2d
and logistic, Gauss-Newton for mlp), betas (0, 0) so no averaging and rho = lr, so an unclipped step is
a diagonal Newton step and lr is the largest move per coordinate. Every method except Newton gets
the same log-spaced lr grid; each is reported at its best lr (fewest steps to the tolerance, then
lowest final loss).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sophia.bench.machine import check_out_dir, machine_info
from sophia.fileio import atomic_write_json, atomic_write_text
from sophia.optim import SophiaG

METHODS = ("GD", "Adam", "SignGD", "Newton", "SophiaG")


@dataclass
class Problem:
    name: str
    description: str
    theta0: torch.Tensor
    loss: Callable[[torch.Tensor], torch.Tensor]
    # (gradient, curvature diagonal for SophiaG, matrix for Newton)
    derivatives: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    f_star: float
    tol: float


def problem_2d() -> Problem:
    a, c = 25.0, 0.005  # curvatures at the minimum (1, -1): 25 and 0.01

    def loss(t):
        return a * torch.log(torch.cosh(t[0] - 1)) + c * (t[1] + 1) ** 2

    def derivatives(t):
        th = torch.tanh(t[0] - 1)
        g = torch.stack([a * th, 2 * c * (t[1] + 1)])
        h = torch.stack([a * (1 - th ** 2), torch.full_like(th, 2 * c)])
        return g, h, torch.diag(h)

    return Problem("2d", "25 log cosh(x - 1) + 0.005 (y + 1)^2 from (-2.17, 3.41); curvatures 25 and 0.01 at the "
                   "minimum (1, -1)", torch.tensor([-2.17, 3.41], dtype=torch.float64), loss, derivatives, 0.0, 1e-6)


def problem_logistic(n: int = 500, d: int = 20, lam: float = 1e-3, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1.5, 1.5, d, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    w_true = torch.randn(d, generator=g, dtype=torch.float64) / scales
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(X @ w_true)).double()

    def loss(w):
        z = X @ w
        return torch.nn.functional.softplus(z).mean() - (y * z).mean() + 0.5 * lam * (w @ w)

    def derivatives(w):
        p = torch.sigmoid(X @ w)
        grad = X.T @ (p - y) / n + lam * w
        s = p * (1 - p)
        H = (X.T * s) @ X / n + lam * torch.eye(d, dtype=torch.float64)
        return grad, torch.diagonal(H).clone(), H

    w = torch.zeros(d, dtype=torch.float64)
    for _ in range(100):  # Newton to machine precision: the reference minimum
        grad, _, H = derivatives(w)
        w = w - torch.linalg.solve(H, grad)
    return Problem("logistic", f"logistic regression, n={n}, d={d}, feature scales 10^-1.5..10^1.5, L2 {lam:g}",
                   torch.zeros(d, dtype=torch.float64), loss, derivatives, float(loss(w)), 1e-6)


def problem_mlp(n: int = 200, d: int = 4, width: int = 8, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    sizes = [(width, d), (width,), (1, width), (1,)]
    counts = [math.prod(s) for s in sizes]

    def unpack(t):
        parts, i = [], 0
        for s, c in zip(sizes, counts):
            parts.append(t[i:i + c].view(s))
            i += c
        return parts

    def forward(t):
        W1, b1, W2, b2 = unpack(t)
        return (torch.tanh(X @ W1.T + b1) @ W2.T + b2).squeeze(-1)

    teacher = torch.randn(sum(counts), generator=g, dtype=torch.float64) * 1.5
    target = forward(teacher)

    def loss(t):
        return ((forward(t) - target) ** 2).mean()

    def derivatives(t):
        J = torch.func.jacrev(forward)(t)  # (n, P)
        r = forward(t) - target
        GN = 2 * J.T @ J / n  # the Gauss-Newton matrix of the mean squared error
        return 2 * J.T @ r / n, torch.diagonal(GN).clone(), GN

    theta0 = torch.randn(sum(counts), generator=g, dtype=torch.float64) * 0.5
    return Problem("mlp", f"tanh network {d}-{width}-1 fitted to a teacher of the same shape, n={n} (non-convex)",
                   theta0, loss, derivatives, 0.0, 1e-4 * float(loss(theta0)))


def run_method(problem: Problem, method: str, lr: float, steps: int) -> dict[str, Any]:
    theta = problem.theta0.clone()
    path, losses = [theta.clone()], [float(problem.loss(theta))]
    opt = None
    param = torch.nn.Parameter(theta.clone())
    if method == "Adam":
        opt = torch.optim.Adam([param], lr=lr)
    elif method == "SophiaG":
        opt = SophiaG([param], lr=lr, betas=(0.0, 0.0), rho=lr, weight_decay=0.0, eps=1e-12)
    reached = 0 if losses[0] - problem.f_star <= problem.tol else None
    for t in range(1, steps + 1):
        grad, hdiag, H = problem.derivatives(param.detach() if opt else theta)
        if method == "GD":
            theta = theta - lr * grad
        elif method == "SignGD":
            theta = theta - lr * torch.sign(grad)
        elif method == "Newton":
            try:
                theta = theta - torch.linalg.solve(H, grad)
            except RuntimeError:  # a singular matrix: Newton is undefined here
                theta = torch.full_like(theta, math.nan)
        else:
            param.grad = grad.clone()
            if method == "SophiaG":
                opt.update_hessian(estimates=[hdiag])
            opt.step()
            theta = param.detach().clone()
        f = float(problem.loss(theta))
        path.append(theta.clone())
        losses.append(f)
        if not math.isfinite(f) or f > 1e12:  # diverged
            losses[-1] = math.inf
            break
        if reached is None and f - problem.f_star <= problem.tol:
            reached = t
            break  # the tolerance is the goal: the rest of the budget is not run
    out = {"method": method, "lr": lr, "steps_to_tol": reached, "final_gap": losses[-1] - problem.f_star,
           "losses": losses}
    if problem.theta0.numel() == 2:
        out["path"] = [p.tolist() for p in path]
    return out


def _better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    if b is None:
        return True
    def key(r):
        return (r["steps_to_tol"] if r["steps_to_tol"] is not None else math.inf,
                r["final_gap"] if math.isfinite(r["final_gap"]) else math.inf)

    return key(a) < key(b)


def solve(problem: Problem, lrs: list[float], steps: int) -> dict[str, Any]:
    best: dict[str, dict[str, Any]] = {}
    grid: dict[str, list[dict[str, Any]]] = {}
    for method in METHODS:
        for lr in ([1.0] if method == "Newton" else lrs):
            r = run_method(problem, method, lr, steps)
            grid.setdefault(method, []).append({k: r[k] for k in ("lr", "steps_to_tol", "final_gap")})
            if _better(r, best.get(method)):
                best[method] = r
    return {"problem": problem.name, "description": problem.description, "f_star": problem.f_star,
            "tol": problem.tol, "steps": steps, "best": best, "grid": grid}


def plot(results: list[dict[str, Any]], problems: dict[str, Problem], out: Path) -> list[str]:
    from sophia.plotting import finish_axes, pyplot, save

    plt = pyplot()
    files = []
    two = next((r for r in results if r["problem"] == "2d"), None)
    if two is not None:
        p = problems["2d"]
        xs = torch.linspace(-3.0, 3.0, 300, dtype=torch.float64)
        ys = torch.linspace(-2.5, 4.0, 300, dtype=torch.float64)
        X, Y = torch.meshgrid(xs, ys, indexing="xy")
        Z = p.loss(torch.stack([X, Y])).numpy()
        fig, ax = plt.subplots(figsize=(7.5, 6))
        ax.contour(X.numpy(), Y.numpy(), Z, levels=[0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 60], colors="grey",
                   linewidths=0.6)
        for method, r in two["best"].items():
            path = torch.tensor(r["path"])
            finite = torch.isfinite(path).all(dim=1)
            path = path[finite][:400]
            label = f"{method}" + ("" if method == "Newton" else f" (lr {r['lr']:g})")
            ax.plot(path[:, 0], path[:, 1], marker=".", ms=3, lw=1, label=label)
        ax.plot([1], [-1], "k*", ms=12)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-2.5, 4)
        finish_axes(ax, "x (sharp: curvature 25 at the minimum)", "y (flat: curvature 0.01)",
                    "2-D toy: first 400 steps at each method's best lr")
        save(fig, out / "toy_2d_trajectories.png")
        files.append("toy_2d_trajectories.png")
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
    axes = [axes] if len(results) == 1 else axes
    for ax, res in zip(axes, results):
        for method, r in res["best"].items():
            gaps = [max(f - res["f_star"], 1e-17) if math.isfinite(f) else math.nan for f in r["losses"]]
            ax.plot(gaps, label=method)
        ax.axhline(res["tol"], color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        finish_axes(ax, "step", "loss - minimum", res["problem"])
    save(fig, out / "toy_losses.png")
    return files + ["toy_losses.png"]


def report(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["# Toy problems: where curvature information helps", "", f"Command: `{result['command']}`", "",
             f"Machine: {m['cpu']}, torch {m['torch']}. Float64, full batch, exact derivatives.", "",
             f"lr grid (every method but Newton): {', '.join(f'{x:g}' for x in result['lrs'])}; at most "
             f"{result['steps']} steps. SophiaG here is idealised: this library's SophiaG fed the exact curvature "
             "diagonal every step, no averaging (betas 0, 0), rho = lr (an unclipped step is a diagonal Newton "
             "step; lr caps the move per coordinate). Newton: the full matrix, step 1 (Gauss-Newton for mlp).", ""]
    for res in result["problems"]:
        lines += [f"## {res['problem']}: {res['description']}", "",
                  f"Tolerance: loss - minimum <= {res['tol']:.3g} (minimum {res['f_star']:.6g}).", "",
                  "| method | best lr | steps to tolerance | loss - minimum where it stopped |", "|---|---:|---:|---:|"]
        for method, r in res["best"].items():
            steps = r["steps_to_tol"] if r["steps_to_tol"] is not None else f"not in {res['steps']}"
            gap = r["final_gap"]
            lines.append(f"| {method} | {'-' if method == 'Newton' else format(r['lr'], 'g')} | {steps} | "
                         + (f"{gap:.3g}" if math.isfinite(gap) else "diverged") + " |")
        lines.append("")
    lines += ["Plots: `toy_2d_trajectories.png` (paths on the 2-D loss), `toy_losses.png` (loss gap per step)."]
    return "\n".join(lines) + "\n"


OUTPUTS = ("report.md", "results.json", "toy_2d_trajectories.png", "toy_losses.png")


def main(out_dir: str, quick: bool = False, command: str = "sophia bench toy",
         overwrite: bool = False) -> dict[str, Any]:
    out = check_out_dir(out_dir, OUTPUTS, overwrite)
    if quick:
        lrs, steps = [1e-3, 1e-2, 1e-1, 1.0], 100
    else:
        lrs, steps = [float(f"{10 ** (e / 2):.3g}") for e in range(-8, 3)], 3000  # 1e-4 .. 10, factor ~3.16
    problems = {p.name: p for p in (problem_2d(), problem_logistic(), problem_mlp())}
    results = [solve(p, lrs, steps) for p in problems.values()]
    result = {"command": command, "machine": machine_info(), "lrs": lrs, "steps": steps, "problems": results}
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = plot(results, problems, out)
    slim = json.loads(json.dumps(result))
    for res in slim["problems"]:  # keep the json small: curves and paths are in the plots
        for r in res["best"].values():
            r.pop("path", None)
            r["losses"] = r["losses"][:: max(1, len(r["losses"]) // 200)]
    atomic_write_json(out / "results.json", slim)
    text = report(result)
    atomic_write_text(out / "report.md", text)
    print(text)
    return result
