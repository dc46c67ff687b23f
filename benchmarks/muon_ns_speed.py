"""Muon + AdamW step time with the Newton-Schulz iteration in bfloat16 (torch's) against float32, side by side
in one process (alternating, 3 rounds of 20 steps each, one thread), on a preset's GPT with random gradients.

    python benchmarks/muon_ns_speed.py tiny      # or small
"""

from __future__ import annotations

import sys
import time

import torch

from sophia.lm.model import GPT, GPTConfig
from sophia.lm.optimizers import OptimizerSettings, build_optimizer
from sophia.lm.presets import get_preset


def main(preset: str = "tiny") -> None:
    torch.set_num_threads(1)
    p = get_preset(preset)
    model = GPT(GPTConfig(block_size=p["block_size"], vocab_size=256, n_layer=p["n_layer"], n_head=p["n_head"],
                          n_embd=p["n_embd"], bias=p["bias"]))
    for w in model.parameters():
        w.grad = torch.randn_like(w)
    ms: dict[str, list[float]] = {}
    for dtype in (torch.bfloat16, torch.float32) * 3:
        opt = build_optimizer("muon", model.param_groups(0.1), OptimizerSettings(
            lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, muon_lr=0.04, muon_ns_dtype=dtype))
        opt.step()  # state allocated outside the timing
        t = time.perf_counter()
        for _ in range(20):
            opt.step()
        ms.setdefault(str(dtype).removeprefix("torch."), []).append((time.perf_counter() - t) / 20 * 1e3)
    print(preset, {k: [round(x, 1) for x in v] for k, v in ms.items()}, "ms per step")


if __name__ == "__main__":
    main(*sys.argv[1:])
