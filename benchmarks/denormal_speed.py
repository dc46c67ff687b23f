"""What flushing denormals is worth on this CPU: forward+backward of trained checkpoints with and without
flush-to-zero, interleaved in one process (medians of repeats), and the share of subnormal entries in the
attention weights' gradients.

    OMP_NUM_THREADS=1 python benchmarks/denormal_speed.py RUN_DIR [RUN_DIR ...] [--repeats 15] [--attention math]

``--attention``: the model's attention path, ``sdpa`` (the fused kernel, what Sophia-G, AdamW and the other
first-order runs train with) or ``math`` (the explicit softmax that stores the attention probabilities: what
Sophia-H and AdaHessian train with, for their double backward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sophia.denormal import flush_denormals
from sophia.lm.checkpoint import load_checkpoint
from sophia.lm.data import fixed_batches, load_dataset
from sophia.lm.model import ATTENTION, GPT, GPTConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--attention", choices=ATTENTION, default="sdpa")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for run in a.runs:
        ckpt = load_checkpoint(Path(run), purpose="bench")
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        model.set_attention(a.attention)
        cfg = ckpt["config"]
        data = load_dataset(Path(ckpt["dataset_dir"]))
        x, y = fixed_batches(data.val, cfg["batch_size"], cfg["block_size"], 1, seed=7)[0]

        def fwd_bwd(model=model, x=x, y=y):
            model.zero_grad(set_to_none=True)
            model(x, y)[1].backward()

        fwd_bwd()
        qkv = torch.cat([b.attn.qkv.weight.grad.flatten() for b in model.blocks])
        tiny = torch.finfo(torch.float32).tiny
        subnormal = ((qkv != 0) & (qkv.abs() < tiny)).float().mean().item()
        times = {False: [], True: []}
        for _ in range(a.repeats):
            for flush in (False, True):
                with flush_denormals(flush):
                    t0 = time.perf_counter()
                    fwd_bwd()
                    times[flush].append(time.perf_counter() - t0)
        stats = model.eval().attention_stats(x)
        row = {"run": run, "step": ckpt["step"], "attention": a.attention, "subnormal_qkv_grad_share": subnormal,
               "max_attn_logit": max(stats["attn_max_logit"]), "min_attn_entropy": min(stats["attn_entropy"]),
               "ms_denormals_kept": 1e3 * statistics.median(times[False]),
               "ms_flushed": 1e3 * statistics.median(times[True])}
        row["speedup"] = row["ms_denormals_kept"] / row["ms_flushed"]
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
