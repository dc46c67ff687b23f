"""Attention over training, with and without QK-norm: the lowest layer entropy and the largest attention
logit at each evaluation, from the runs of `benchmarks/attention_runs.sh`. Writes attention.png and
report.md into the folder.

    python benchmarks/plot_attention.py benchmarks/results/attention-tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

from sophia.lm.metrics import read_metrics
from sophia.plotting import finish_axes, pyplot, save


def main(folder: str) -> None:
    root = Path(folder)
    runs = sorted(d for d in (root / "runs").iterdir() if d.is_dir() and (d / "metrics.jsonl").exists())
    plt = pyplot()
    fig, (ax_e, ax_l) = plt.subplots(1, 2, figsize=(12, 4.6))
    rows = []
    for d in runs:
        evals = [e for e in read_metrics(d) if e.get("event") == "eval" and "attn_entropy" in e]
        if not evals:
            continue
        steps = [e["step"] for e in evals]
        style = "-" if d.name.endswith("-qk-norm") and not d.name.endswith("no-qk-norm") else "--"
        label = d.name.replace("-no-qk-norm", "").replace("-qk-norm", " + QK-norm")
        line, = ax_e.plot(steps, [min(e["attn_entropy"]) for e in evals], style, label=label)
        ax_l.plot(steps, [max(e["attn_max_logit"]) for e in evals], style, color=line.get_color(), label=label)
        last = evals[-1]
        rows.append((label, last["step"], last["val_loss"], max(last["attn_max_logit"]), min(last["attn_entropy"]),
                     (d / "done").exists()))
    ax_l.set_yscale("log")
    finish_axes(ax_e, "step", "lowest layer attention entropy (nats)", "attention entropy (dashed: no QK-norm)")
    finish_axes(ax_l, "step", "largest attention logit", "attention logits (log scale)")
    save(fig, root / "attention.png")
    lines = ["# Attention over training on `tiny`, with and without QK-norm", "",
             "Command: `bash benchmarks/attention_runs.sh benchmarks/results/attention-tiny` then "
             "`python benchmarks/plot_attention.py benchmarks/results/attention-tiny`", "",
             "Machine: AMD EPYC, 2 cores (shared), torch 2.13.0 CPU, one thread per run. 300 steps of 4,096 tokens, "
             "warm-up 100 then cosine to lr/10, seed 1, one run each; attention measured on the first validation "
             "batch at every evaluation (every 25 steps).", "",
             "| run | step | val loss | max attention logit | min layer entropy |", "|---|---:|---:|---:|---:|"]
    for label, step, loss, logit, ent, done in rows:
        lines.append(f"| {label}{'' if done else ' (unfinished)'} | {step} | {loss:.3f} | {logit:,.1f} | {ent:.2f} |")
    lines += ["", "![attention](attention.png)"]
    (root / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
