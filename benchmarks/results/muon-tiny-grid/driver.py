"""The driver of this grid: `sophia train` with two changes, for the reasons in README.md.

1. muon_lr reaches OptimizerSettings (train.py did not pass cfg.muon_lr yet when the grid ran).
2. torch Muon's Newton-Schulz iteration runs in float32 instead of bfloat16: bfloat16 matmuls on
   this AVX2 CPU made a tiny step about 1 s slower (the iteration itself, coefficients and order
   of operations, is torch's).

Usage: python driver.py train --preset tiny --optimizer muon --muon-lr Y ... (the flags of sophia train).
"""

import functools
import sys

import torch
import torch.optim._muon as torch_muon

import sophia.lm.train as sophia_train
from sophia.cli import main
from sophia.lm.optimizers import OptimizerSettings


def newton_schulz_float32(grad, coefficients, steps, eps):
    a, b, c = coefficients
    x = grad.float()
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


if __name__ == "__main__":
    torch_muon._zeropower_via_newtonschulz = newton_schulz_float32
    argv = sys.argv[1:]
    muon_lr = float(argv[argv.index("--muon-lr") + 1])
    sophia_train.OptimizerSettings = functools.partial(OptimizerSettings, muon_lr=muon_lr)
    sys.exit(main(argv))
