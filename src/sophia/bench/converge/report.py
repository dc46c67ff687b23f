"""How a sweep is shown: the plots (loss against steps and time with the seed range, and the lr sensitivity),
the markdown report and the line that names the machine."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from sophia.bench.converge.spec import NAMES


def _band(runs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    n = min(len(r["evals"]) for r in runs)
    xs, mean, lo, hi = [], [], [], []
    for i in range(n):
        vals = [r["evals"][i]["val_loss"] for r in runs]
        xs.append(statistics.fmean(r["evals"][i][key] for r in runs))
        mean.append(statistics.fmean(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return xs, mean, lo, hi


def plot(analysis: dict[str, Any], out: Path, title: str, device: str = "cpu") -> list[str]:
    from sophia.plotting import finish_axes, pyplot, save

    per_run = "one GPU per run" if device == "cuda" else "one thread"
    plt = pyplot()
    files = []
    for key, label, fname in (("step", "step", "loss_vs_steps.png"),
                              ("elapsed", f"training wall-clock (s, {per_run})", "loss_vs_time.png")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for opt, d in analysis["optimizers"].items():
            xs, mean, lo, hi = _band(d["runs"], key)
            line, = ax.plot(xs, mean, label=f"{NAMES.get(opt, opt)} (lr {d['best_lr']:g})")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        ref = NAMES.get(analysis["reference"], analysis["reference"])
        ax.axhline(analysis["target"], color="grey", ls=":", lw=1, label=f"{ref} final (mean)")
        finals = [d["final_mean"] for d in analysis["optimizers"].values() if math.isfinite(d["final_mean"])]
        if finals:
            ax.set_ylim(min(finals) - 0.1, max(finals) + 0.9)
        finish_axes(ax, label, "validation loss (mean, band: min-max over seeds)", title)
        save(fig, out / fname)
        files.append(fname)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for opt, d in analysis["optimizers"].items():
        pts = [g for g in d["grid"] if g["rho"] == d["best_rho"]]
        ys = [g["final_val_loss"] if math.isfinite(g["final_val_loss"]) else float("nan") for g in pts]
        ax.plot([g["lr"] for g in pts], ys, marker="o", label=NAMES.get(opt, opt))
    ax.set_xscale("log")
    finish_axes(ax, "peak lr", "final validation loss (seed 0)",
                "lr sensitivity (Sophia at its best rho; diverged runs omitted)")
    save(fig, out / "loss_vs_lr.png")
    return files + ["loss_vs_lr.png"]


def _rho(rho: float | None) -> str:
    return "" if rho is None else format(rho, "g")


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "not reached"
    return "diverged" if not math.isfinite(x) else format(x, spec)


def _machine_line(spec: dict[str, Any], m: dict[str, Any]) -> str:
    if spec.get("device", "cpu") == "cuda":
        gpus = m.get("gpus", 1)
        share = ("each run had its GPU to itself" if spec["jobs"] <= gpus else
                 "runs shared GPUs, so it is rough")
        return (f"Machine: {m.get('gpu', 'a CUDA GPU')} (the first of {gpus} visible), {m['cpu']}, "
                f"torch {m['torch']}; {spec['jobs']} runs at a time over {gpus} GPU(s), each run on one. Wall-clock "
                f"is training time only (no evaluation or checkpoints); {share}.")
    return (f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; {spec['jobs']} runs at a time, one "
            f"thread each. Wall-clock is training time only (no evaluation or checkpoints), taken while "
            f"{spec['jobs']} runs shared the machine.")


def report(result: dict[str, Any]) -> str:
    spec, a, m = result["spec"], result["analysis"], result["machine"]
    opts = a["optimizers"]
    ref = NAMES.get(a["reference"], a["reference"])
    tokens = spec["steps"] * spec["tokens_per_step"]
    lines = [
        f"# Convergence: {', '.join(NAMES.get(o, o) for o in opts)} on `{spec['preset']}`, tuned alike", "",
        f"Command: `{result['command']}`", "",
        _machine_line(spec, m), "",
        f"Budget: {spec['steps']} steps of {spec['tokens_per_step']:,} tokens ({tokens:,} tokens), warm-up "
        f"{spec['warmup_steps']} steps then cosine to lr/10, the preset's other settings for each optimizer; "
        f"validation loss on {spec['eval_batches']} fixed batches every {spec['eval_every']} steps."
        + (" Every optimizer's model has QK-norm (`--qk-norm`)." if spec["model"].get("qk_norm") else "")
        + (f" Muon's Newton-Schulz iteration in {spec['muon_ns_dtype']} (`--muon-ns-dtype`; torch's is bfloat16)."
           if spec.get("muon_ns_dtype") else ""), "",
        f"Tuning, the same for every optimizer: lr grid factor 2 apart at seed 0, grown by one point while "
        f"the best sat at an edge (at most {spec['max_extend']} times); "
        + (f"Sophia's rho fixed at {spec['rhos'][0]:g}" if len(spec["rhos"]) == 1 else
           f"Sophia also a rho grid ({', '.join(f'{r:g}' for r in spec['rhos'])}) at its best lr")
        + f"; then the chosen setting at "
        f"{spec['seeds']} fresh seeds (1 to {spec['seeds']}: model init and data order). Seed 0, which chose "
        "the setting, is not among them: every number below comes from the fresh seeds.", "",
        "## Final validation loss at the chosen setting", "",
        f"| optimizer | best lr | rho | tuning runs | final loss mean | sd | min-max | vs {ref} | Welch t | "
        "ranges overlap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for opt, d in opts.items():
        vs = d.get("vs_ref")
        lines.append(
            f"| {NAMES.get(opt, opt)} | {d['best_lr']:g} | {_rho(d['best_rho'])} | {d['tuning_runs']} | "
            f"{_fmt(d['final_mean'], '.4f')} | {d['final_sd']:.4f} | "
            f"{_fmt(d['final_min'], '.3f')}-{_fmt(d['final_max'], '.3f')} | "
            + (f"{vs['diff']:+.4f} | {_fmt(vs['welch_t'], '+.1f') if vs['welch_t'] is not None else 'n/a'} | "
               f"{'yes' if vs['ranges_overlap'] else 'no'} |"
               if vs else "| | |"))
    if any(d.get("attention") for d in opts.values()):
        lines += ["", "## Attention at the end of training (fresh seeds)", "",
                  "The largest attention logit over layers and the lowest per-layer attention entropy (nats) on "
                  "the first validation batch, range over seeds. Logits in the hundreds with entropy near 0 mean "
                  "saturated, near one-hot attention.", "",
                  "| optimizer | max attention logit | min layer entropy |", "|---|---:|---:|"]
        for opt, d in opts.items():
            at = d.get("attention")
            if at:
                lines.append(f"| {NAMES.get(opt, opt)} | {min(at['max_logit']):,.0f}-{max(at['max_logit']):,.0f} | "
                             f"{min(at['min_entropy']):.2f}-{max(at['min_entropy']):.2f} |")
    lines += ["", f"## To {ref}'s final loss ({a['target']:.4f}, the mean over its seeds)", "",
              "Where each optimizer's mean curve (over seeds) first reaches that loss, interpolated between "
              f"evaluations; passes are forward/backward pairs, Hessian estimates included. Speedup = {ref}'s "
              "value / the optimizer's; in brackets the range over single seeds (seeds that reached it).", "",
              "| optimizer | seeds reaching | steps | speedup (steps) | tokens | passes | speedup (passes) | "
              "wall-clock s | speedup (time) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def sp(t):
        if "speedup" not in t:
            return "-"
        rng = f" ({t['speedup_seeds_min']:.2f}-{t['speedup_seeds_max']:.2f})" if "speedup_seeds_min" in t else ""
        return f"{t['speedup']:.2f}x{rng}"

    for opt, d in opts.items():
        t = d["to_target"]
        lines.append(f"| {NAMES.get(opt, opt)} | {d['reached']}/{len(d['runs'])} | "
                     f"{_fmt(t['steps']['mean_curve'], '.0f')} | {sp(t['steps'])} | "
                     f"{_fmt(t['tokens']['mean_curve'], ',.0f')} | {_fmt(t['passes']['mean_curve'], '.0f')} | "
                     f"{sp(t['passes'])} | {_fmt(t['elapsed']['mean_curve'], '.0f')} | {sp(t['elapsed'])} |")
    others = [(opt, d) for opt, d in opts.items() if "reference_to_this_loss" in d]
    if others:
        lines += ["", f"## The other way round: where {ref} reaches each optimizer's final loss", "",
                  f"{ref}'s mean curve against each optimizer's mean final loss. Ratio = what {ref} needs / what "
                  "the optimizer spent over its whole budget: below 1, the optimizer is slower than "
                  f"{ref} (an equivalent speedup).", "",
                  f"| optimizer | its final loss | {ref} steps | ratio (steps) | ratio (passes) | ratio (time) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for opt, d in others:
            r = d["reference_to_this_loss"]
            if r is None:
                lines.append(f"| {NAMES.get(opt, opt)} | {d['final_mean']:.4f} | not reached | - | - | - |")
                continue
            lines.append(f"| {NAMES.get(opt, opt)} | {d['final_mean']:.4f} | {r['steps']['reference']:.0f} | "
                         + " | ".join(_fmt(r[k]["ratio"], ".2f") + "x" for k in ("steps", "passes", "elapsed"))
                         + " |")
    lines += ["", f"A seed counts as reaching the target when its own curve gets there within the budget (so some of "
              f"{ref}'s own seeds do not). No time-to-target is given for an optimizer with a diverged seed.", "",
              "## lr sensitivity (seed 0, the tuning runs)", "",
              "| optimizer | rho | " + "lr: final loss |", "|---|---:|---|"]
    for opt, d in opts.items():
        for rho in sorted({g["rho"] for g in d["grid"]}, key=lambda r: r or 0):
            pts = [g for g in d["grid"] if g["rho"] == rho]
            cells = ", ".join(f"{g['lr']:g}: {_fmt(g['final_val_loss'], '.3f')}" for g in pts)
            lines.append(f"| {NAMES.get(opt, opt)} | {_rho(rho)} | {cells} |")
    lines += ["", "Plots: `loss_vs_steps.png`, `loss_vs_time.png`, `loss_vs_lr.png`."]
    return "\n".join(lines) + "\n"

