"""Sophia-G's refresh (forward and backward of the sampled-label loss) on CPU: labels drawn eagerly with
torch.multinomial after the forward (how sophia-lab drew them before) against drawn inside the forward by
inverse CDF (``GPT.forward(x, sample_uniform=u)``, what `sophia train` does now). Interleaved, one thread,
medians; the model of a preset at its micro-batch.

    OMP_NUM_THREADS=1 python benchmarks/refresh_sampler_speed.py [small] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sophia.lm.config import resolve_config
from sophia.lm.model import GPT, GPTConfig
from sophia.lm.train import _vocab_guess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("preset", nargs="?", default="small")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = resolve_config(a.preset, "sophiag")
    vocab = _vocab_guess(cfg.tokenizer)
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd, bias=cfg.bias))
    x = torch.randint(0, vocab, (cfg.batch_size, cfg.block_size))

    def multinomial_after() -> None:
        logits, _ = model(x)
        probs = torch.softmax(logits.detach().float(), -1).reshape(-1, logits.shape[-1])
        labels = torch.multinomial(probs, 1).view(logits.shape[:-1])
        F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()

    def inverse_cdf_inside() -> None:
        model(x, sample_uniform=torch.rand(x.shape))[1].backward()

    ways = {"multinomial after the forward": multinomial_after, "inverse CDF inside the forward": inverse_cdf_inside}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for f in ways.values():
        f()  # warm-up
    for _ in range(a.repeats):
        for name, f in ways.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    print(f"{a.preset}: micro-batch {cfg.batch_size} x {cfg.block_size}, vocabulary {vocab}, one thread, "
          f"medians of {a.repeats}")
    base = statistics.median(times["multinomial after the forward"])
    for name, ts in times.items():
        print(f"  {name}: {statistics.median(ts):.3f} s ({statistics.median(ts) / base:.2f}x)")


if __name__ == "__main__":
    main()
