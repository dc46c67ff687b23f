"""The verdict against the budget: each optimizer's final validation loss (mean and seed range) and its
speed relative to AdamW, from finished `sophia bench converge` sweeps of one preset at several step
budgets. Writes budget.png and budget.md into OUT.

Speed relative to AdamW, one number per optimizer and budget (AdamW = 1): where the optimizer's mean
curve reaches AdamW's final loss at step s within the budget B, B / s (above 1: faster); where it does
not, AdamW's mean curve reaches the optimizer's final loss at step s', and the number is s' / B (below 1:
slower; 0.63 means AdamW needed 63% of the steps). Forward/backward passes, Hessian estimates counted,
give the second column of the table the same way.

    python benchmarks/plot_budget.py OUT benchmarks/results/converge-tiny benchmarks/results/converge-tiny-1000 ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sophia.bench.converge import NAMES
from sophia.plotting import finish_axes, pyplot, save


def relative(o: dict, budget: float, key: str) -> float | None:
    """The speed against AdamW on ``key`` (steps or passes), as the module docstring defines it."""
    reach = (o.get("to_target") or {}).get(key, {}).get("mean_curve")
    if o.get("reached") and reach:
        return budget / reach
    ref = (o.get("reference_to_this_loss") or {}).get(key, {})
    return ref.get("ratio")


def collect(dirs: list[str]) -> list[dict]:
    rows = []
    for d in dirs:
        r = json.loads((Path(d) / "results.json").read_text())
        spec, a = r["spec"], r["analysis"]
        ref_last = a["optimizers"][a["reference"]]["runs"][0]["evals"][-1]
        ref_passes = ref_last["train_passes"] + ref_last["hessian_passes"]  # AdamW's passes over its budget
        for name, o in a["optimizers"].items():
            budget = spec["steps"]
            row = {"sweep": Path(d).name, "preset": spec["preset"], "steps": budget, "optimizer": name,
                   "lr": o["best_lr"], "rho": o.get("best_rho"), "mean": o["final_mean"], "sd": o["final_sd"],
                   "min": o["final_min"], "max": o["final_max"], "seeds": len(o["finals"]),
                   "vs_adamw_steps": 1.0 if name == a["reference"] else relative(o, budget, "steps")}
            if name != a["reference"]:
                p = relative(o, ref_passes, "passes")
                row["vs_adamw_passes"] = p
            rows.append(row)
    return rows


def main(out: str, *dirs: str) -> None:
    rows = collect(list(dirs))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    fig, (ax_l, ax_s) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name in [n for n in NAMES if any(r["optimizer"] == n for r in rows)]:
        mine = sorted((r for r in rows if r["optimizer"] == name), key=lambda r: r["steps"])
        x = [r["steps"] for r in mine]
        ax_l.errorbar(x, [r["mean"] for r in mine], yerr=[[r["mean"] - r["min"] for r in mine],
                                                            [r["max"] - r["mean"] for r in mine]],
                      marker="o", capsize=3, label=NAMES[name])
        speed = [(r["steps"], r["vs_adamw_steps"]) for r in mine if r["vs_adamw_steps"]]
        if speed:
            ax_s.plot(*zip(*speed), marker="o", label=NAMES[name])
    for ax in (ax_l, ax_s):
        ax.set_xscale("log")
    ax_s.axhline(1.0, color="grey", lw=0.8)
    preset = rows[0]["preset"] if rows else "?"
    finish_axes(ax_l, "training steps (budget)", "final validation loss (mean, seed range)",
                f"{preset}: final loss against the budget")
    finish_axes(ax_s, "training steps (budget)", "speed relative to AdamW (steps)",
                "above 1: reaches AdamW's loss sooner")
    save(fig, out_dir / "budget.png")
    lines = [f"# `{preset}`: the verdict against the budget", "",
             f"    python benchmarks/plot_budget.py {out} {' '.join(dirs)}", "",
             "Each budget is its own tuning (the converge procedure: lr grid at seed 0, rho for Sophia, then "
             "fresh seeds). Speed relative to AdamW: the module docstring of benchmarks/plot_budget.py.", "",
             "| budget (steps) | optimizer | lr (rho) | final val loss, mean ± sd | seed range | seeds | "
             "speed vs AdamW, steps | passes |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["steps"], list(NAMES).index(r["optimizer"]))):
        setting = f"{r['lr']:g}" + (f" ({r['rho']:g})" if r["rho"] is not None else "")
        sp = r["vs_adamw_steps"]
        pp = r.get("vs_adamw_passes")
        lines.append(f"| {r['steps']} | {NAMES[r['optimizer']]} | {setting} | {r['mean']:.3f} ± {r['sd']:.3f} | "
                     f"{r['min']:.3f}-{r['max']:.3f} | {r['seeds']} | {f'{sp:.2f}x' if sp else '-'} | "
                     f"{f'{pp:.2f}x' if pp else '-'} |")
    (out_dir / "budget.md").write_text("\n".join(lines) + "\n")
    (out_dir / "budget.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])
