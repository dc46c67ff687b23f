"""What a smaller Hessian batch does to Sophia-G's Gauss-Newton-Bartlett estimate.

For a trained checkpoint, draw R independent estimates h_hat = N * g_hat**2 (labels sampled from the model,
g_hat the gradient of the mean sampled loss over N predictions) on fresh batches of the full micro-batch and
of a fraction of it, and compare per coordinate: the mean (both are unbiased for the same Gauss-Newton
diagonal) and the coefficient of variation sd/mean. With sampled labels g_hat has mean zero, so N * g_hat**2
is about sigma^2 times a chi-square with one degree of freedom whatever N: its relative spread should not
shrink with the batch (CV about sqrt(2)), and a quarter batch costs a quarter of the refresh. The EMA over
refreshes (beta2 = 0.99) is what averages the noise.

    OMP_NUM_THREADS=1 python benchmarks/gnb_fraction_variance.py RUN_DIR [--draws 24 --fraction 0.25]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sophia.hessian import categorical_sampled_loss
from sophia.lm.checkpoint import load_checkpoint
from sophia.lm.data import get_batch, load_dataset
from sophia.lm.model import GPT, GPTConfig


def estimates(model, data, batch, block, draws, seed):
    gen = torch.Generator().manual_seed(seed)
    lab = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(draws):
        x, _ = get_batch(data.train, batch, block, gen)
        model.zero_grad(set_to_none=True)
        s = categorical_sampled_loss(model(x)[0], generator=lab)
        s.loss.backward()
        out.append(torch.cat([s.n * p.grad.flatten() ** 2 for p in model.parameters()]))
    return torch.stack(out).double()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--draws", type=int, default=24)
    ap.add_argument("--fraction", type=float, default=0.25)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(Path(a.run), purpose="bench")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    cfg = ckpt["config"]
    data = load_dataset(Path(ckpt["dataset_dir"]))
    full = estimates(model, data, cfg["batch_size"], cfg["block_size"], a.draws, 11)
    part = estimates(model, data, max(1, round(cfg["batch_size"] * a.fraction)), cfg["block_size"], a.draws, 22)
    m_full, m_part = full.mean(0), part.mean(0)
    keep = m_full > m_full.quantile(0.5)  # coordinates with curvature worth estimating
    cv_full = (full.std(0)[keep] / m_full[keep]).median().item()
    cv_part = (part.std(0)[keep] / m_part[keep]).median().item()
    ratio = (m_part.sum() / m_full.sum()).item()
    cos = torch.nn.functional.cosine_similarity(m_full, m_part, dim=0).item()
    print(json.dumps({"run": a.run, "step": ckpt["step"], "batch": cfg["batch_size"], "fraction": a.fraction,
                      "draws": a.draws, "median_cv_full": cv_full, "median_cv_fraction": cv_part,
                      "mean_ratio_fraction_over_full": ratio, "cosine_of_means": cos}))


if __name__ == "__main__":
    main()
