"""The verdict against the budget, or against the batch size: from finished `sophia bench converge` sweeps
of one preset, each optimizer's final validation loss (mean and seed range) and its speed relative to
AdamW. Sweeps at several step budgets (the default): budget.png, budget.md and budget.json in OUT.
Sweeps at one step budget and several batch sizes (`--by batch`): batch.png, batch.md and batch.json,
with the steps each optimizer needs to common target losses against the tokens per step (the
batch-scaling curve) and the usual comparison at each batch size.

Speed relative to AdamW, one number per optimizer and budget (AdamW = 1): where the optimizer's mean
curve reaches AdamW's final loss at step s within the budget B, B / s (above 1: faster); where it does
not, AdamW's mean curve reaches the optimizer's final loss at step s', and the number is s' / B (below 1:
slower; 0.63 means AdamW needed 63% of the steps). Forward/backward passes, Hessian estimates counted,
give the second column of the table the same way.

    python benchmarks/plot_budget.py OUT benchmarks/results/converge-tiny benchmarks/results/converge-tiny-1000 ...
    python benchmarks/plot_budget.py --by batch OUT benchmarks/results/converge-tiny-b1024 ...

Against the batch size, targets common to every sweep: the worst final mean loss of any optimizer at any
batch size (every mean curve reaches it) and AdamW's worst (tighter). Steps to a target are read off the
mean curve over the fresh seeds, interpolated between evaluations. With perfect batch scaling a doubled
batch halves them: the "per doubling" factor is 2 there and 1 where the batch no longer helps. The trend of
SophiaG's step ratio against AdamW (AdamW's steps to a loss over SophiaG's) is the least-squares line of
log ratio on log batch (:func:`trend`): its factor per doubling, and where, extrapolated, it would reach 1.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from sophia.bench.converge import NAMES, Setting, crossing, mean_curve
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


# -- against the batch size --------------------------------------------------------------------------------
def _train_tokens(spec: dict) -> int | None:
    """Tokens in the training split the sweep read (from its data's meta.json), for epochs."""
    from sophia.lm.config import resolve_config

    cfg = resolve_config(spec["preset"], spec["optimizers"][0], dict(spec.get("model", {})))
    for meta in Path(spec["data_root"]).glob(f"{cfg.corpus}-*/meta.json"):
        m = json.loads(meta.read_text())
        if m.get("tokenizer") == cfg.tokenizer:
            return m["train_tokens"]
    return None


def _seed_signals(sweep: Path, opt: str, o: dict, seeds: int) -> dict:
    """Per fresh seed: SophiaG's win rate (mean over the logged steps after warm-up, and at the end) from the runs'
    own metrics.jsonl, and the largest attention logit at the end (from the sweep's results)."""
    out: dict = {"win_rate_mean": [], "win_rate_final": [],
                 "max_logit": list((o.get("attention") or {}).get("max_logit", []))}
    for seed in range(1, seeds + 1):
        run = sweep / "runs" / Setting(opt, o["best_lr"], o.get("best_rho"), seed).name / "metrics.jsonl"
        if not run.exists():
            continue
        events = [json.loads(line) for line in run.read_text().splitlines() if line.strip()]
        start = next((e for e in events if e.get("event") == "start"), {})
        warmup = start.get("config", {}).get("warmup_steps", 0)
        rates = [e["win_rate"] for e in events if e.get("event") == "train" and "win_rate" in e
                 and e["step"] > warmup]
        summary = next((e for e in events if e.get("event") == "summary"), {})
        if rates:
            out["win_rate_mean"].append(statistics.fmean(rates))
        if "win_rate" in summary:
            out["win_rate_final"].append(summary["win_rate"])
    return out


def batch_collect(dirs: list[str]) -> tuple[list[dict], dict[str, float]]:
    sweeps = []
    for d in dirs:
        r = json.loads((Path(d) / "results.json").read_text())
        sweeps.append((Path(d), r["spec"], r["analysis"]))
    finals = [o["final_mean"] for _, _, a in sweeps for o in a["optimizers"].values() if math.isfinite(o["final_mean"])]
    adamw = [a["optimizers"]["adamw"]["final_mean"] for _, _, a in sweeps if "adamw" in a["optimizers"]]
    targets = {"worst final loss": max(finals)}
    if adamw and math.isfinite(max(adamw)):
        targets["AdamW's worst final loss"] = max(adamw)
    rows = []
    for path, spec, a in sweeps:
        train_tokens = _train_tokens(spec)
        for name, o in a["optimizers"].items():
            curve = mean_curve(o["runs"])
            end = curve[-1]
            row = {"sweep": path.name, "preset": spec["preset"], "steps": spec["steps"],
                   "tokens_per_step": spec["tokens_per_step"],
                   "epochs": spec["steps"] * spec["tokens_per_step"] / train_tokens if train_tokens else None,
                   "optimizer": name, "lr": o["best_lr"], "rho": o.get("best_rho"), "mean": o["final_mean"],
                   "sd": o["final_sd"], "min": o["final_min"], "max": o["final_max"], "seeds": len(o["finals"]),
                   "passes": end["train_passes"] + end["hessian_passes"], "to_targets": {}}
            for label, t in targets.items():
                c = crossing(curve, t) if math.isfinite(o["final_mean"]) else None
                row["to_targets"][label] = {"steps": c["steps"], "passes": c["passes"]} if c else None
            if name != a["reference"]:
                vs = o.get("vs_ref") or {}
                row["diff"], row["welch_t"] = vs.get("diff"), vs.get("welch_t")
                ref_reach = (o.get("reference_to_this_loss") or {})
                row["adamw_reaches_its_loss"] = {k: (ref_reach.get(k) or {}).get("ratio") for k in ("steps", "passes")}
                tt = o.get("to_target") or {}
                row["reaches_adamws_loss"] = {k: (tt.get(k) or {}).get("speedup") for k in ("steps", "passes")} \
                    if o.get("reached") else None
            row.update(_seed_signals(path, name, o, spec["seeds"]))
            rows.append(row)
    return rows, targets


def trend(points: list[tuple[float, float]]) -> dict | None:
    """A ratio's trend against the batch: the least-squares line of log2(ratio) on log2(tokens per step).

    Returns the factor by which the ratio changes per doubling of the batch, and the tokens per step at which
    the line reaches 1 (None where it moves away from 1, or is flat), from two or more points with positive
    ratios; None otherwise. An extrapolation, to be read as such."""
    pts = [(math.log2(b), math.log2(r)) for b, r in points if b > 0 and r and r > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    # the line reaches log2(ratio) = 0 ahead of the last batch size only if it moves towards it
    cross = None
    if slope != 0 and my != 0 and (slope > 0) == (my < 0):
        cross = 2 ** (mx - my / slope)
    return {"per_doubling": 2 ** slope, "crosses_one_at_tokens_per_step": cross, "points": len(pts)}


def _fmt(x: float | None, spec: str, none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _mean_of(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def batch_main(out: str, *dirs: str) -> None:
    rows, targets = batch_collect(list(dirs))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in NAMES if any(r["optimizer"] == n for r in rows)]
    plt = pyplot()
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(12, 4.6))
    for (label, _), style in zip(targets.items(), ("-", "--")):
        for i, name in enumerate(names):
            mine = sorted((r for r in rows if r["optimizer"] == name and r["to_targets"][label]),
                          key=lambda r: r["tokens_per_step"])
            if mine:
                ax_t.plot([r["tokens_per_step"] for r in mine], [r["to_targets"][label]["steps"] for r in mine],
                          style, marker="o", color=f"C{i}", label=f"{NAMES[name]}: {label} ({targets[label]:.3f})")
        if style == "-":  # perfect scaling from the smallest batch of the first optimizer
            first = sorted((r for r in rows if r["optimizer"] == names[0] and r["to_targets"][label]),
                           key=lambda r: r["tokens_per_step"])
            if first:
                b0, s0 = first[0]["tokens_per_step"], first[0]["to_targets"][label]["steps"]
                xs = [r["tokens_per_step"] for r in first]
                ax_t.plot(xs, [s0 * b0 / b for b in xs], ":", color="grey", lw=1, label="perfect scaling")
    ax_t.set_xscale("log", base=2)
    ax_t.set_yscale("log")
    ref = "adamw"
    for i, name in enumerate(names):
        if name == ref:
            continue
        mine = sorted((r for r in rows if r["optimizer"] == name), key=lambda r: r["tokens_per_step"])
        refs = {r["sweep"]: r for r in rows if r["optimizer"] == ref}
        pts = [(r["tokens_per_step"], r["mean"] / refs[r["sweep"]]["mean"]) for r in mine if r["sweep"] in refs]
        ax_r.plot(*zip(*pts), marker="o", color=f"C{i}", label=f"{NAMES[name]} / AdamW, final loss")
        steps = [(r["tokens_per_step"], r["adamw_reaches_its_loss"]["steps"]) for r in mine
                 if r.get("adamw_reaches_its_loss", {}).get("steps")]
        if steps:
            ax_r.plot(*zip(*steps), "--", marker="s", color=f"C{i}",
                      label=f"AdamW's steps to {NAMES[name]}'s loss / {NAMES[name]}'s")
    ax_r.axhline(1.0, color="grey", lw=0.8)
    ax_r.set_xscale("log", base=2)
    preset = rows[0]["preset"] if rows else "?"
    steps = rows[0]["steps"] if rows else "?"
    finish_axes(ax_t, "tokens per step", "steps to the target loss (mean curve)",
                f"{preset}, {steps} steps: steps to a common loss against the batch")
    finish_axes(ax_r, "tokens per step", "ratio", "SophiaG against AdamW at each batch size")
    save(fig, out_dir / "batch.png")

    cmd = f"python benchmarks/plot_budget.py --by batch {out} {' '.join(dirs)}"
    lines = [f"# `{preset}`: the verdict against the batch size ({steps} steps at every size)", "", f"    {cmd}", "",
             "Each batch size is its own tuning (lr grid at seed 0 with the edge rule, rho fixed, then fresh seeds); "
             "every sweep evaluates on the same validation windows. See the module docstring of "
             "benchmarks/plot_budget.py for the targets and the per-doubling factor.", "",
             "## Final loss at each batch size", "",
             "| tokens/step | epochs | optimizer | lr (rho) | final val loss, mean ± sd | seed range | vs AdamW | "
             "Welch t | AdamW reaches its loss at (steps / passes) | it reaches AdamW's at | SophiaG win rate "
             "(mean after warm-up / end) | largest attention logit |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = list(NAMES)
    for r in sorted(rows, key=lambda r: (r["tokens_per_step"], order.index(r["optimizer"]))):
        setting = f"{r['lr']:g}" + (f" ({r['rho']:g})" if r["rho"] is not None else "")
        ar = r.get("adamw_reaches_its_loss") or {}
        reach = r.get("reaches_adamws_loss")
        wr = (f"{_fmt(_mean_of(r['win_rate_mean']), '.3f')} / {_fmt(_mean_of(r['win_rate_final']), '.3f')}"
              if r["win_rate_final"] else "")
        lines.append(
            f"| {r['tokens_per_step']:,} | {_fmt(r['epochs'], '.2f')} | {NAMES[r['optimizer']]} | {setting} | "
            f"{r['mean']:.3f} ± {r['sd']:.3f} | {r['min']:.3f}-{r['max']:.3f} | "
            f"{_fmt(r.get('diff'), '+.3f', '')} | {_fmt(r.get('welch_t'), '.1f', '')} | "
            + (f"{_fmt(ar.get('steps'), '.2f')}x / {_fmt(ar.get('passes'), '.2f')}x" if ar else "")
            + " | " + (f"{_fmt(reach.get('steps'), '.2f')}x / {_fmt(reach.get('passes'), '.2f')}x" if reach else
                       ("not within its budget" if "diff" in r else ""))
            + f" | {wr} | {_fmt(_mean_of(r['max_logit']), '.0f')} |")
    for label, t in targets.items():
        lines += ["", f"## Steps to {label}: {t:.4f}", "",
                  "| tokens/step | " + " | ".join(f"{NAMES[n]} steps | per doubling" for n in names) + " |",
                  "|---:|" + "---:|---:|" * len(names)]
        sizes = sorted({r["tokens_per_step"] for r in rows})
        prev: dict[str, tuple[int, float | None]] = {}  # the previous batch size and its steps
        for b in sizes:
            cells = []
            for n in names:
                r = next((r for r in rows if r["optimizer"] == n and r["tokens_per_step"] == b), None)
                s_ = (r["to_targets"][label] or {}).get("steps") if r else None
                b0, s0 = prev.get(n, (b, None))
                # per doubling of the batch: a step from 4,096 to 16,384 tokens is two doublings
                factor = (s0 / s_) ** (1 / math.log2(b / b0)) if s0 and s_ else None
                cells.append(f"{_fmt(s_, '.0f', 'not reached')} | {_fmt(factor, '.2f')}")
                prev[n] = (b, s_)
            lines.append(f"| {b:,} | " + " | ".join(cells) + " |")
    trends = {}
    for n in names:
        if n == ref:
            continue
        mine = sorted((r for r in rows if r["optimizer"] == n), key=lambda r: r["tokens_per_step"])
        series = {f"AdamW's steps to {NAMES[n]}'s final loss / {NAMES[n]}'s":
                  [(r["tokens_per_step"], (r.get("adamw_reaches_its_loss") or {}).get("steps")) for r in mine]}
        for label in targets:
            pairs = []
            for r in mine:
                a_ = next((x for x in rows if x["optimizer"] == ref and x["sweep"] == r["sweep"]), None)
                s_ = (r["to_targets"][label] or {}).get("steps")
                sa = (a_["to_targets"][label] or {}).get("steps") if a_ else None
                pairs.append((r["tokens_per_step"], sa / s_ if s_ and sa else None))
            series[f"AdamW's steps to {label} / {NAMES[n]}'s"] = pairs
        for what, pts in series.items():
            trends[what] = {"points": [[b, v] for b, v in pts], "fit": trend([(b, v) for b, v in pts if v])}
    if trends:
        lines += ["", "## The trend of the step ratio (below 1: SophiaG needs more steps than AdamW)", "",
                  "| ratio | " + " | ".join(f"{b:,}" for b in sorted({r['tokens_per_step'] for r in rows}))
                  + " | per doubling (fit) | reaches 1x at (tokens/step, extrapolated) |",
                  "|---|" + "---:|" * (len({r['tokens_per_step'] for r in rows}) + 2)]
        for what, t in trends.items():
            fit = t["fit"] or {}
            cross = fit.get("crosses_one_at_tokens_per_step")
            used = f" ({fit['points']} points)" if fit else ""
            lines.append(f"| {what} | " + " | ".join(_fmt(v, ".2f", "not reached") for _, v in t["points"])
                         + f" | {_fmt(fit.get('per_doubling'), '.3f')}{used} | "
                         + (f"{cross:,.0f}" if cross else ("never: moving away from 1" if fit else "-")) + " |")
        lines += ["", "Per doubling: the factor by which the ratio changes when the batch doubles, from the "
                  "least-squares line of log ratio on log batch over the points shown (above 1: SophiaG "
                  "gaining on AdamW as the batch grows)."]
    lines += ["", "Plot: `batch.png` (left: steps to each target against tokens per step, log-log, with perfect "
              "scaling dotted; right: SophiaG's final loss over AdamW's, and AdamW's steps to SophiaG's loss over "
              "SophiaG's)."]
    (out_dir / "batch.md").write_text("\n".join(lines) + "\n")
    summary = {"command": cmd, "targets": targets, "rows": rows, "trends": trends}
    (out_dir / "batch.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if args else 2)
    if args[:2] == ["--by", "batch"]:
        batch_main(*args[2:])
    elif args[:2] == ["--by", "budget"]:
        main(*args[2:])
    else:
        main(*args)
