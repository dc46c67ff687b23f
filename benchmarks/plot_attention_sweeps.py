"""Attention over training at each optimizer's chosen setting of two converge sweeps that differ only in
QK-norm: the lowest layer entropy and the largest attention logit at every evaluation, per fresh seed, from
the runs' metrics.jsonl (which the sweeps keep on disk). Writes attention.png, attention.json (the plotted
series) and report.md into OUT.

    python benchmarks/plot_attention_sweeps.py OUT SWEEP_WITHOUT_QK_NORM SWEEP_WITH_QK_NORM
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sophia.bench.converge import Setting
from sophia.lm.metrics import read_metrics
from sophia.plotting import finish_axes, pyplot, save

NAMES = {"adamw": "AdamW", "sophiag": "SophiaG", "lion": "Lion", "muon": "Muon"}


def series(sweep: Path, optimizers: list[str]) -> dict[str, list[dict]]:
    """{optimizer: [{seed, steps, entropy, logit}]} for the fresh seeds at the sweep's chosen setting."""
    analysis = json.loads((sweep / "results.json").read_text())["analysis"]["optimizers"]
    out = {}
    for opt in optimizers:
        if opt not in analysis:
            continue
        runs = []
        for r in analysis[opt]["runs"]:
            run = sweep / "runs" / Setting(opt, r["lr"], r["rho"], r["seed"]).name
            evals = [e for e in read_metrics(run) if e.get("event") == "eval" and "attn_entropy" in e]
            runs.append({"seed": r["seed"], "lr": r["lr"], "rho": r["rho"], "steps": [e["step"] for e in evals],
                         "entropy": [min(e["attn_entropy"]) for e in evals],
                         "logit": [max(e["attn_max_logit"]) for e in evals]})
        out[opt] = runs
    return out


def main(out_dir: str, without: str, with_qk: str, optimizers: str = "adamw,sophiag") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = optimizers.split(",")
    data = {"without": series(Path(without), opts), "with": series(Path(with_qk), opts)}
    plt = pyplot()
    fig, (ax_e, ax_l) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"adamw": "tab:blue", "sophiag": "tab:red", "lion": "tab:green", "muon": "tab:purple"}
    rows = []
    for variant, style in (("without", "--"), ("with", "-")):
        for opt, runs in data[variant].items():
            for i, r in enumerate(runs):
                label = (f"{NAMES.get(opt, opt)}{' + QK-norm' if variant == 'with' else ''} (lr {r['lr']:g})"
                         if i == 0 else None)
                ax_e.plot(r["steps"], r["entropy"], style, color=colors.get(opt), alpha=0.8, label=label)
                ax_l.plot(r["steps"], r["logit"], style, color=colors.get(opt), alpha=0.8, label=label)
            last_e = [r["entropy"][-1] for r in runs]
            last_l = [r["logit"][-1] for r in runs]
            rows.append((NAMES.get(opt, opt) + (" + QK-norm" if variant == "with" else ""), runs[0]["lr"],
                         min(last_l), max(last_l), min(last_e), max(last_e), min(r["entropy"][i] for r in runs
                                                                                   for i in range(len(r["steps"])))))
    ax_l.set_yscale("log")
    finish_axes(ax_e, "step", "lowest layer attention entropy (nats)", "attention entropy (dashed: no QK-norm)")
    finish_axes(ax_l, "step", "largest attention logit", "attention logits (log scale)")
    save(fig, out / "attention.png")
    (out / "attention.json").write_text(json.dumps(data) + "\n")
    lines = ["# Attention over training at each optimizer's chosen setting, with and without QK-norm", "",
             f"Command: `python benchmarks/plot_attention_sweeps.py {out_dir} {without} {with_qk}`", "",
             "Every fresh seed of each sweep's chosen setting; attention on the first validation batch at every "
             "evaluation. Final values are ranges over seeds; the lowest entropy is over the whole run.", "",
             "| optimizer | lr | final max logit | final min layer entropy | lowest entropy during the run |",
             "|---|---:|---:|---:|---:|"]
    for name, lr, l0, l1, e0, e1, emin in rows:
        lines.append(f"| {name} | {lr:g} | {l0:,.0f}-{l1:,.0f} | {e0:.2f}-{e1:.2f} | {emin:.2f} |")
    lines += ["", "![attention](attention.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])
