"""What a finished sweep says: where a loss curve first reaches a target (``crossing``), curves averaged over
seeds (``mean_curve``), and ``analyse``: per optimizer its chosen setting, final loss over the fresh seeds, the
steps, tokens, passes and time to the reference's final loss, and the comparison with the reference."""

from __future__ import annotations

import math
import statistics
from typing import Any, Protocol

from sophia.bench.converge.spec import Setting


class FinishedSweep(Protocol):
    """What ``analyse`` reads of a sweep (a ``runner.Sweep`` after its ``plan``)."""

    spec: dict[str, Any]
    results: dict[Setting, dict[str, Any]]

    def best_settings(self) -> dict[str, tuple[float, float | None]]: ...


def crossing(evals: list[dict[str, Any]], target: float) -> dict[str, float] | None:
    """The first point where the validation loss reaches ``target``, linearly interpolated between
    evaluations, in steps, tokens, passes (training + Hessian) and training seconds; None if never."""
    prev = None
    for e in evals:
        if e["val_loss"] <= target:
            if prev is None:
                f = 1.0
                prev = e
            else:
                f = (prev["val_loss"] - target) / (prev["val_loss"] - e["val_loss"])

            def at(key, a=prev, b=e, f=f):
                return a[key] + f * (b[key] - a[key])

            return {"steps": at("step"), "tokens": at("tokens"), "elapsed": at("elapsed"),
                    "passes": at("train_passes") + at("hessian_passes")}
        prev = e
    return None


def mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Evaluations averaged over seeds, point by point (loss and every x-axis quantity)."""
    n = min(len(r["evals"]) for r in runs)
    keys = ("step", "val_loss", "tokens", "elapsed", "train_passes", "hessian_passes")
    return [{k: statistics.fmean(r["evals"][i][k] for r in runs) for k in keys} for i in range(n)]


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    if not all(math.isfinite(x) for x in xs):  # a diverged seed
        return math.inf, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def analyse(sweep: FinishedSweep) -> dict[str, Any]:
    spec, results = sweep.spec, sweep.results
    best = sweep.best_settings()
    per_opt: dict[str, dict[str, Any]] = {}
    for opt in spec["optimizers"]:
        lr, rho = best[opt]
        runs = [results[Setting(opt, lr, rho, seed)] for seed in range(1, spec["seeds"] + 1)]
        finals = [r["final_val_loss"] for r in runs]
        grid = sorted(({"lr": s.lr, "rho": s.rho, "final_val_loss": r["final_val_loss"], "status": r["status"]}
                       for s, r in results.items() if s.optimizer == opt and s.seed == 0),
                      key=lambda g: (g["rho"] or 0, g["lr"]))
        mean, sd = _mean_sd(finals)
        attn = [r for r in runs if "attn_max_logit" in r]
        if attn:  # per seed: the largest logit over layers and the lowest layer entropy
            per_opt_attn = {"max_logit": [max(r["attn_max_logit"]) for r in attn],
                            "min_entropy": [min(r["attn_entropy"]) for r in attn]}
        else:
            per_opt_attn = None
        per_opt[opt] = {"attention": per_opt_attn, "diverged_seeds": sum(not math.isfinite(f) for f in finals),
                        "best_lr": lr, "best_rho": rho, "finals": finals, "final_mean": mean, "final_sd": sd,
                        "final_min": min(finals), "final_max": max(finals), "grid": grid, "runs": runs,
                        "tuning_runs": len(grid)}
    ref_name = "adamw" if "adamw" in per_opt else spec["optimizers"][0]
    ref = per_opt[ref_name]
    target = ref["final_mean"]
    keys = ("steps", "tokens", "passes", "elapsed")
    # The reference's own mean curve reaches the target at its last evaluation: its budget.
    ref_cross = crossing(mean_curve(ref["runs"]), target) if math.isfinite(target) else None
    for opt, d in per_opt.items():
        usable = ref_cross is not None and d["diverged_seeds"] == 0  # a diverged seed: no time-to-target
        mc = crossing(mean_curve(d["runs"]), target) if usable else None
        seeds = [crossing(r["evals"], target) for r in d["runs"]] if usable else [None] * len(d["runs"])
        d["reached"] = sum(c is not None for c in seeds)
        d["to_target"] = {}
        for key in keys:
            t = {"mean_curve": mc[key] if mc else None, "per_seed": [c[key] if c else None for c in seeds]}
            if mc and mc[key] > 0:
                t["speedup"] = ref_cross[key] / mc[key]
                per = [ref_cross[key] / c[key] for c in seeds if c and c[key] > 0]
                if per:
                    t["speedup_seeds_min"], t["speedup_seeds_max"] = min(per), max(per)
            d["to_target"][key] = t
        # The other way round: where the reference's mean curve reaches this optimizer's final loss, as a
        # fraction of this optimizer's whole budget (below 1: the reference needs less).
        if opt != ref_name and ref_cross is not None and math.isfinite(d["final_mean"]):
            rc = crossing(mean_curve(ref["runs"]), d["final_mean"])
            end = mean_curve(d["runs"])[-1]
            spent = {"steps": end["step"], "tokens": end["tokens"], "elapsed": end["elapsed"],
                     "passes": end["train_passes"] + end["hessian_passes"]}
            d["reference_to_this_loss"] = (
                {key: {"reference": rc[key], "ratio": rc[key] / spent[key] if spent[key] > 0 else None}
                 for key in keys} if rc else None)
        # Against the reference over seeds: Welch's t and whether the seed ranges overlap.
        if opt != ref_name and math.isfinite(d["final_mean"]):
            diff = d["final_mean"] - ref["final_mean"]
            se = math.sqrt(d["final_sd"] ** 2 / len(d["finals"]) + ref["final_sd"] ** 2 / len(ref["finals"]))
            d["vs_ref"] = {"diff": diff, "welch_t": diff / se if se > 0 else None,
                           "ranges_overlap": not (d["final_min"] > ref["final_max"]
                                                  or d["final_max"] < ref["final_min"])}
    return {"target": target, "reference": ref_name, "optimizers": per_opt}

