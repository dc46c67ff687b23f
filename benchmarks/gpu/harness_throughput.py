"""Tokens per second and MFU of `sophia train` on a GPU, after warm-up, for AdamW, SophiaG and SophiaH,
and what each speed feature is worth (each switched off once), side by side in one session.

Each configuration is a short `sophia train` run (compiled, bf16 autocast, the preset's micro-batch of
12 x 1024) whose steady-state speed comes from its summary event (the first steps and compilation left
out). The data: GPT-2-tokenized Shakespeare prepared beforehand (`sophia data prepare shakespeare
--tokenizer gpt2`); for speed the text does not matter. Writes throughput.md and throughput.json.

    python benchmarks/gpu/harness_throughput.py OUT_DIR [--preset gpt2-small --steps 40 --grad-accum 4]
    python benchmarks/gpu/harness_throughput.py OUT_DIR --device cpu --quick   # the plumbing, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [  # (label, optimizer, extra flags)
    ("AdamW", "adamw", []),
    ("SophiaG k=10", "sophiag", []),
    ("SophiaG k=10, Hessian on 1/4 batch", "sophiag", ["--hessian-batch-fraction", "0.25"]),
    ("SophiaH k=10", "sophiah", []),
    ("AdamW, vocabulary not padded", "adamw", ["--vocab-pad-multiple", "1"]),
    ("AdamW, foreach (not fused)", "adamw", ["--no-fused-optimizer"]),
    ("SophiaG, foreach step (no CUDA graph)", "sophiag", ["--no-fused-optimizer"]),
    ("AdamW, not compiled", "adamw", ["--no-compile"]),
]


def run(label, optimizer, extra, a, workdir: Path) -> dict:
    out = workdir / f"{optimizer}-{abs(hash(label)) % 10**8}"
    cmd = [sys.executable, "-m", "sophia", "train", "--preset", a.preset, "--optimizer", optimizer,
           "--corpus", a.corpus, "--tokenizer", a.tokenizer, "--data-root", a.data_root, "--device", a.device,
           "--grad-accum", str(a.grad_accum), "--max-steps", str(a.steps), "--eval-every", str(10**6),
           "--eval-batches", "2", "--log-every", "5", "--checkpoint-every", str(10**6), "--out-dir", str(out),
           "--no-progress", "--warmup-steps", "5", "--keep-checkpoints", "1", *extra]
    if a.quick:
        cmd += ["--n-layer", "1", "--n-embd", "64", "--n-head", "2", "--block-size", "64", "--batch-size", "4"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    wall = time.perf_counter() - t0
    row = {"label": label, "optimizer": optimizer, "flags": extra, "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        row["stderr_tail"] = proc.stderr[-3000:]
        return row
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = [e for e in events if e["event"] == "summary"][-1]
    start = [e for e in events if e["event"] == "start"][0]
    row.update({k: summary.get(k) for k in ("steady_tokens_per_s", "steady_mfu", "tokens", "elapsed",
                                           "hessian_passes", "train_passes")})
    row["flops_per_token"], row["peak_tflops"] = start.get("flops_per_token"), start.get("peak_tflops")
    return row


def write_table(rows: list[dict], a, out: Path) -> str:
    ref = next((r.get("steady_tokens_per_s") for r in rows if r["label"] == "AdamW"), None)
    lines = [f"# `sophia train` throughput: {a.preset}, {a.steps} steps of 12 x 1024 x {a.grad_accum} tokens, "
             f"{a.device}", "", "Steady state: the summary's tokens/s after the first steps (compilation excluded); "
             "MFU = tokens/s x FLOPs per token (6N + 12 L T d) / peak.", "",
             "| configuration | tokens/s | MFU | / AdamW | Hessian passes | wall s |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][:100]} | | | | {r['wall_s']} |")
            continue
        tps, mfu = r.get("steady_tokens_per_s"), r.get("steady_mfu")
        rel = f"{tps / ref:.3f}" if tps and ref else "-"
        lines.append(f"| {r['label']} | {tps:,.0f} | {f'{100 * mfu:.1f}%' if mfu else '-'} | {rel} | "
                     f"{r.get('hessian_passes')} | {r['wall_s']} |")
    text = "\n".join(lines) + "\n"
    (out / "throughput.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--tokenizer", default="gpt2")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--only", default=None, help="comma-separated config numbers (0-based)")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"sophia-throughput-{os.getpid()}"
    picks = [int(i) for i in a.only.split(",")] if a.only else range(len(CONFIGS))
    rows = []
    for i in picks:
        rows.append(run(*CONFIGS[i], a, workdir))
        print(json.dumps(rows[-1]), flush=True)
        (out / "throughput.json").write_text(json.dumps({"preset": a.preset, "steps": a.steps,
                                                         "grad_accum": a.grad_accum, "rows": rows}, indent=2))
        write_table(rows, a, out)  # after every row, so a run cut short by its time limit keeps its table
    print(write_table(rows, a, out))


if __name__ == "__main__":
    main()
