"""The stand-in main job until the training harness lands: SophiaG against AdamW, side by side.

A small MLP classifier learns labels produced by a fixed random teacher network, with the
same seed, data and number of steps for both optimizers; SophiaG refreshes its
Gauss-Newton-Bartlett estimate every k steps on a fresh batch (counted as an extra pass).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from sophia.hessian import categorical_sampled_loss, gnb_refresh
from sophia.optim import SophiaG


def _model(d_in: int, width: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, classes))


def run_demo(steps: int = 600, seed: int = 0, k: int = 10, batch: int = 256) -> dict[str, list[float]]:
    d_in, classes = 32, 10
    gen = torch.Generator().manual_seed(seed)
    teacher = _model(d_in, 64, classes)
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=gen) * (1.5 / p.shape[-1] ** 0.5)

    def data(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, d_in, generator=g)
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(teacher(x) * 2, -1), 1, generator=g).squeeze(1)
        return x, y

    x_val, y_val = data(4096, torch.Generator().manual_seed(seed + 1))
    curves: dict[str, list[float]] = {}
    for name in ("adamw", "sophiag"):
        torch.manual_seed(seed)
        model = _model(d_in, 128, classes)
        if name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        else:
            opt = SophiaG(model.parameters(), lr=3e-3, rho=0.05, weight_decay=0.2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
        g = torch.Generator().manual_seed(seed + 2)
        losses, passes, t0 = [], 0, time.perf_counter()
        for step in range(steps):
            x, y = data(batch, g)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            passes += 1
            if name == "sophiag" and step % k == k - 1:
                xh, _ = data(batch, g)
                gnb_refresh(opt, lambda xh=xh, model=model: categorical_sampled_loss(model(xh)))
                passes += 1
            if step % 100 == 99 or step == steps - 1:
                with torch.no_grad():
                    losses.append(F.cross_entropy(model(x_val), y_val).item())
        curves[name] = losses
        extra = f", win rate {opt.diagnostics()['win_rate']:.2f}" if name == "sophiag" else ""
        print(f"{name:8s} val loss {losses[-1]:.4f}  forward/backward passes {passes}  "
              f"{time.perf_counter() - t0:.1f}s{extra}")
    return curves


def main(steps: int = 600) -> None:
    print(f"sophia-lab demo: MLP on a teacher-labelled task, {steps} steps, same seed and data")
    curves = run_demo(steps=steps)
    print("\nvalidation loss every 100 steps")
    print(f"{'step':>6} {'adamw':>8} {'sophiag':>8}")
    for i, (a, s) in enumerate(zip(curves["adamw"], curves["sophiag"])):
        print(f"{min((i + 1) * 100, steps):>6} {a:8.4f} {s:8.4f}")
    print("\n(stand-in demo; the GPT training harness replaces it)")
