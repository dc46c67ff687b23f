"""``sophia bench converge``: steps, compute and time to the same validation loss, tuned alike.

Every optimizer gets the same tuning procedure on the same preset, token budget and schedule
(warm-up then cosine to lr/10):

1. an lr grid (log-spaced, factor 2) at seed 0; while the best lr sits at an edge of the grid,
   the grid grows by one point on that side (at most ``max_extend`` times);
2. for Sophia only, a rho grid at its best lr (the issue's "and a rho grid for Sophia");
3. the best setting again at ``seeds`` fresh seeds (1 .. seeds); seed 0, which chose the setting,
   is left out of the comparison so that the optimizer with more settings to choose from gains
   nothing from a lucky tuning seed.

For Muon the swept lr is its Muon lr (``--muon-lr``, the hidden matrices'), the one that matters;
its AdamW part (embeddings, norms, biases) keeps the preset's lr, recorded in the sweep as
``adamw_part_lr`` and passed as ``--lr`` with ``--min-lr`` a tenth of it. The Muon groups follow
the same schedule at a fixed multiple, so the Muon lr too decays to a tenth.

Each run is ``sophia train`` in its own process, ``jobs`` at a time: on the CPU with one thread
each; with ``device="cuda"`` each run on one GPU of those visible (``CUDA_VISIBLE_DEVICES`` or all),
handed out in turn, so that with one job per GPU the wall-clock is every run's own. A run
whose ``result.json`` exists is never redone; an interrupted one resumes from its checkpoint.
A diverged run counts as infinitely bad and is not retried. The report compares the best
settings over seeds: final validation loss, and the steps, tokens, forward/backward passes
(Hessian estimates counted) and training wall-clock each needs to reach AdamW's mean final
validation loss.
"""

from __future__ import annotations

import json
import math
import os
import queue
import statistics
import subprocess
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sophia.bench.machine import machine_info
from sophia.lm.checkpoint import has_checkpoint, read_metrics
from sophia.lm.config import TrainError, check_writable_dir, resolve_config
from sophia.lm.presets import QUICK_MODEL

OPTIMIZER_ORDER = ("adamw", "lion", "muon", "adahessian", "sophiah", "sophiag")
NAMES = {"adamw": "AdamW", "lion": "Lion", "muon": "Muon", "adahessian": "AdaHessian", "sophiah": "SophiaH",
         "sophiag": "SophiaG"}
# Starting lr grids (factor 2 apart) for the tiny preset; the edge rule moves them where needed. Other presets
# start from their own lr for each optimizer, halved and doubled (PRESET_GRID).
DEFAULT_LRS = {
    "adamw": (2e-3, 4e-3, 8e-3, 1.6e-2),
    "lion": (5e-4, 1e-3, 2e-3, 4e-3),
    "muon": (0.02, 0.04, 0.08, 0.16),  # the Muon lr (--muon-lr); the AdamW part at the preset's lr
    "adahessian": (0.0375, 0.075, 0.15, 0.3),
    "sophiah": (2.5e-4, 5e-4, 1e-3, 2e-3),
    "sophiag": (2.5e-4, 5e-4, 1e-3, 2e-3),
}
PRESET_GRID = (0.5, 1.0, 2.0)
DEFAULT_RHOS = (0.01, 0.05, 0.2)
DEVICES = ("cpu", "cuda")
SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class Setting:
    optimizer: str
    lr: float
    rho: float | None
    seed: int

    @property
    def name(self) -> str:
        rho = f"-rho{self.rho:g}" if self.rho is not None else ""
        return f"{self.optimizer}-lr{self.lr:g}{rho}-s{self.seed}"


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def is_sophia(optimizer: str) -> bool:
    return optimizer.startswith("sophia")


class Sweep:
    """Runs settings as subprocesses, at most ``jobs`` at a time, skipping finished ones."""

    def __init__(self, out: Path, spec: dict[str, Any], jobs: int, log=print, gpus: list[str] | None = None) -> None:
        self.out, self.spec, self.jobs, self.log = out, spec, jobs, log
        self.device = spec.get("device", "cpu")
        # GPU slots: the visible GPUs in turn, one slot per job (so jobs beyond the GPUs share them)
        self._slots: queue.SimpleQueue[str] = queue.SimpleQueue()
        pool = gpus or ["0"]
        for i in range(jobs if self.device == "cuda" else 0):
            self._slots.put(pool[i % len(pool)])
        self.runs_dir = out / "runs"
        self.results: dict[Setting, dict[str, Any]] = {}
        self.chosen: dict[str, tuple[float, float | None]] = {}  # the pipeline's choice per optimizer
        self._lock = threading.Lock()

    # -- one run ------------------------------------------------------------------------------
    def run_dir(self, s: Setting) -> Path:
        return self.runs_dir / s.name

    def command(self, s: Setting, resume: bool) -> list[str]:
        spec = self.spec
        cmd = [sys.executable, "-m", "sophia", "train", "--out-dir", str(self.run_dir(s)), "--no-progress",
               "--device", self.device]
        if resume:
            return cmd + ["--resume", "--data-root", spec["data_root"]]
        if s.optimizer == "muon":  # the swept lr is Muon's; the AdamW part's is fixed (module docstring)
            lr = spec["adamw_part_lr"]["muon"]
            lrs = ["--muon-lr", repr(s.lr), "--lr", repr(lr), "--min-lr", repr(lr / 10)]
            if "muon_ns_dtype" in spec:
                lrs += ["--muon-ns-dtype", spec["muon_ns_dtype"]]
        else:
            lrs = ["--lr", repr(s.lr), "--min-lr", repr(s.lr / 10)]
        cmd += ["--preset", spec["preset"], "--optimizer", s.optimizer, *lrs, "--seed", str(s.seed),
                "--max-steps", str(spec["steps"]),
                "--eval-every", str(spec["eval_every"]), "--eval-batches", str(spec["eval_batches"]),
                "--checkpoint-every", str(spec["checkpoint_every"]), "--log-every", str(spec["eval_every"]),
                "--warmup-steps", str(spec["warmup_steps"]), "--data-root", spec["data_root"]]
        if s.rho is not None:
            cmd += ["--rho", repr(s.rho)]
        for key, value in spec["model"].items():
            flag = key.replace("_", "-")
            if isinstance(value, bool):
                cmd.append(f"--{flag}" if value else f"--no-{flag}")
            else:
                cmd += ["--" + flag, str(value)]
        return cmd

    def execute(self, s: Setting) -> dict[str, Any]:
        d = self.run_dir(s)
        done = d / "result.json"
        if done.exists():
            return json.loads(done.read_text())
        d.mkdir(parents=True, exist_ok=True)
        resume = has_checkpoint(d)
        threads = "1" if self.device == "cpu" else str(max(1, _usable_cores() // self.jobs))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
        gpu = self._slots.get() if self.device == "cuda" else None
        try:  # the slot goes back whatever happens from here
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            self.log(f"run {s.name}" + (" (resuming)" if resume else "")
                     + (f" on GPU {gpu}" if gpu is not None else ""))
            with open(d / "log.txt", "a") as logf:
                proc = subprocess.run(self.command(s, resume), stdout=logf, stderr=subprocess.STDOUT, env=env)
        finally:
            if gpu is not None:
                self._slots.put(gpu)
        events = read_metrics(d) if (d / "metrics.jsonl").exists() else []
        diverged = any(e.get("event") == "diverged" for e in events)
        if proc.returncode != 0 and not diverged:
            tail = (d / "log.txt").read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise TrainError(f"run {s.name} failed (exit {proc.returncode}): {tail[0]}; log: {d / 'log.txt'}")
        evals = [e for e in events if e.get("event") == "eval"]
        # a loss that turns non-finite only at the last evaluation is a divergence too
        diverged = diverged or not evals or not math.isfinite(evals[-1]["val_loss"])
        result = {"optimizer": s.optimizer, "lr": s.lr, "rho": s.rho, "seed": s.seed,
                  "status": "diverged" if diverged else "ok",
                  "final_val_loss": math.inf if diverged else evals[-1]["val_loss"],
                  "evals": [{k: e[k] for k in ("step", "val_loss", "tokens", "elapsed", "train_passes",
                                               "hessian_passes")} for e in evals]}
        for key in ("attn_max_logit", "attn_entropy"):  # the final attention diagnostics, where logged
            if evals and key in evals[-1]:
                result[key] = evals[-1][key]
        tmp = d / ".result.json.tmp"
        tmp.write_text(json.dumps(result) + "\n")
        os.replace(tmp, done)
        self.log(f"done {s.name}: " + ("diverged" if diverged else f"val loss {result['final_val_loss']:.4f}"))
        return result

    # -- the procedure --------------------------------------------------------------------------
    def plan(self) -> None:
        """Run every optimizer's pipeline (lr grid with edge growth, rho grid, seeds) on a shared pool."""
        spec = self.spec
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            pending: dict[Future, Setting] = {}
            stage: dict[str, dict[str, Any]] = {}

            def submit(s: Setting) -> None:
                pending[pool.submit(self.execute, s)] = s

            for opt in spec["optimizers"]:
                rho = spec["default_rho"][opt] if is_sophia(opt) else None
                lrs = sorted(spec["lrs"][opt])
                stage[opt] = {"phase": "lr", "lrs": lrs, "extended": 0, "rho": rho, "open": len(lrs)}
                for lr in lrs:
                    submit(Setting(opt, lr, rho, 0))
            error: BaseException | None = None
            while pending:
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in finished:
                    s = pending.pop(fut)
                    try:
                        self.results[s] = fut.result()
                    except BaseException as e:  # keep the others running; report the first failure
                        error = error or e
                        continue
                    if error is None:
                        st = stage[s.optimizer]
                        st["open"] -= 1
                        if st["open"] == 0:
                            for nxt in self._advance(s.optimizer, st):
                                submit(nxt)
            if error is not None:
                raise error

    def _score(self, opt: str, lr: float, rho: float | None, seed: int = 0) -> float:
        return self.results[Setting(opt, lr, rho, seed)]["final_val_loss"]

    def _advance(self, opt: str, st: dict[str, Any]) -> list[Setting]:
        spec = self.spec
        if st["phase"] == "lr":
            lrs = st["lrs"]
            best = min(lrs, key=lambda lr: self._score(opt, lr, st["rho"]))
            if st["extended"] < spec["max_extend"] and best in (lrs[0], lrs[-1]) and len(lrs) > 1:
                new = best / 2 if best == lrs[0] else best * 2
                st["lrs"] = sorted(lrs + [new])
                st["extended"] += 1
                st["open"] = 1
                return [Setting(opt, new, st["rho"], 0)]
            st["best_lr"] = best
            if is_sophia(opt):
                st["phase"] = "rho"
                rhos = [r for r in spec["rhos"] if r != st["rho"]]
                if rhos:
                    st["open"] = len(rhos)
                    return [Setting(opt, best, r, 0) for r in rhos]
        if st["phase"] == "rho":
            best_lr = st["best_lr"]
            st["rho"] = min([st["rho"], *spec["rhos"]], key=lambda r: self._score(opt, best_lr, r))
        if st["phase"] in ("lr", "rho"):
            st["phase"] = "seeds"
            self.chosen[opt] = (st["best_lr"], st["rho"])
            seeds = list(range(1, spec["seeds"] + 1))
            st["open"] = len(seeds)
            if seeds:
                return [Setting(opt, st["best_lr"], st["rho"], seed) for seed in seeds]
        st["phase"] = "done"
        return []

    def best_settings(self) -> dict[str, tuple[float, float | None]]:
        """Per optimizer, the setting the tuning chose (and ran at the fresh seeds)."""
        return dict(self.chosen)


# -- analysis --------------------------------------------------------------------------------------
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


def analyse(sweep: Sweep) -> dict[str, Any]:
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
        per_opt[opt] = {"attention": per_opt_attn,"diverged_seeds": sum(not math.isfinite(f) for f in finals),
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


# -- plots and report ---------------------------------------------------------------------------
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


# -- entry point ---------------------------------------------------------------------------------
def build_spec(preset: str, optimizers: list[str], steps: int, seeds: int, lrs: dict[str, list[float]] | None,
               rhos: list[float], eval_every: int, eval_batches: int, data_root: str, jobs: int, quick: bool,
               max_extend: int = 2, qk_norm: bool = False, device: str = "cpu",
               muon_ns_dtype: str = "bfloat16", batch_size: int | None = None,
               grad_accum: int | None = None) -> dict[str, Any]:
    model = dict(QUICK_MODEL) if quick else {}
    # the tokens per step, when not the preset's: recorded only where given, so older sweeps' specs stay equal
    for key, value in (("batch_size", batch_size), ("grad_accum", grad_accum)):
        if value is not None:
            if value < 1:
                raise TrainError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
            model[key] = value
    if quick and device != "cpu":  # a smoke test: compiling each 20-step run would cost more than the run
        model["compile"] = False
    if qk_norm:  # every optimizer gets it: fairness
        model["qk_norm"] = True
    warmup = max(1, steps // 10) if quick else None
    grids, default_rho, tokens_per_step, warmup_steps = {}, {}, None, None
    adamw_part_lr: dict[str, float] = {}
    for opt in optimizers:
        if opt not in NAMES:
            raise TrainError(f"unknown optimizer {opt!r} for bench converge; choose from {', '.join(NAMES)}")
        muon = {"muon_ns_dtype": muon_ns_dtype} if opt == "muon" else {}  # validated there
        cfg = resolve_config(preset, opt, {**model, **muon, "max_steps": steps, "warmup_steps": warmup})
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
        warmup_steps = cfg.warmup_steps
        grid = (lrs or {}).get(opt) or _default_grid(preset, opt, cfg)
        if len(grid) < 2 and not quick:
            raise TrainError(f"the lr grid of {opt} needs at least 2 values")
        grids[opt] = sorted({float(f"{float(x):.6g}") for x in grid})  # no two runs in one folder
        _check_lrs(preset, opt, {**model, **muon, "max_steps": steps, "warmup_steps": warmup}, grids[opt])
        if is_sophia(opt):
            default_rho[opt] = cfg.rho
        if opt == "muon":
            adamw_part_lr = {"muon": cfg.lr}
    # the rho grid is part of the sweep even before a Sophia joins it: checked as Sophia's --rho either way
    for opt in [o for o in optimizers if is_sophia(o)] or ["sophiag"]:
        for rho in rhos:
            try:
                resolve_config(preset, opt, {**model, "max_steps": steps, "warmup_steps": warmup, "rho": rho})
            except TrainError as e:
                raise TrainError(f"--rhos {rho:g}: not a usable rho for {opt} ({e})") from None
    extra = {"adamw_part_lr": adamw_part_lr} if "muon" in optimizers else {}  # older sweeps' specs stay equal
    if device != "cpu":  # likewise: a CPU sweep's spec has no device (the numbers differ across devices)
        extra["device"] = device
    if "muon" in optimizers and muon_ns_dtype != "bfloat16":  # likewise: absent means torch's bfloat16
        extra["muon_ns_dtype"] = muon_ns_dtype
    return {**extra, "preset": preset, "optimizers": optimizers, "steps": steps, "seeds": seeds, "lrs": grids,
            "rhos": sorted({float(f"{float(r):.6g}") for r in rhos}), "default_rho": default_rho,
            "eval_every": eval_every,
            "eval_batches": eval_batches, "checkpoint_every": max(eval_every, steps // 4),
            "warmup_steps": warmup_steps, "tokens_per_step": tokens_per_step, "model": model,
            "data_root": data_root, "jobs": jobs, "max_extend": max_extend}


def _check_lrs(preset: str, opt: str, settings: dict[str, Any], lrs: list[float]) -> None:
    """Every lr of the grid as ``sophia train`` checks it, before any run or sweep.json is written (a bad value
    found after hours of runs would leave a sweep.json that refuses the corrected rerun); likewise the rhos."""
    for lr in lrs:
        # as Sweep.command passes it: Muon's grid is its Muon lr; the others' lr with min-lr a tenth of it
        given = {"muon_lr": lr} if opt == "muon" else {"lr": lr, "min_lr": lr / 10}
        try:
            resolve_config(preset, opt, {**settings, **given})
        except TrainError as e:
            raise TrainError(f"--lrs {opt}={lr:g}: not a usable lr ({e})") from None


def _default_grid(preset: str, opt: str, cfg) -> list[float]:
    """tiny: the built-in grid; another preset: its own lr for the optimizer (Muon's: its Muon lr), halved and
    doubled, for the edge rule to move."""
    if preset == "tiny":
        return list(DEFAULT_LRS[opt])
    from sophia.lm.optimizers import DEFAULT_MUON_LR

    base = (cfg.muon_lr or DEFAULT_MUON_LR) if opt == "muon" else cfg.lr
    return [base * f for f in PRESET_GRID]


def visible_gpus() -> list[str]:
    """The GPUs a CUDA sweep hands its runs to: the entries of CUDA_VISIBLE_DEVICES where it is set, else
    0 .. device_count - 1."""
    import torch

    if not torch.cuda.is_available():
        raise TrainError("bench converge --device cuda: no CUDA device is visible (use --device cpu)")
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in env.split(",") if x.strip()] if env else []
    return ids[: torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


# Settings that may differ when an interrupted sweep is continued (they do not change any run).
_RESUMABLE = {"jobs", "data_root"}
# Per-optimizer settings: compared for the optimizers the saved sweep already has.
_PER_OPTIMIZER = {"lrs", "default_rho", "adamw_part_lr"}


def spec_conflicts(saved: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """The settings that keep ``spec`` from continuing the sweep ``saved``. A sweep may take more
    optimizers (each optimizer's tuning is its own, against the same budget and data), so the optimizer
    list may grow and the per-optimizer settings are compared for the saved optimizers only."""
    old = list(saved.get("optimizers", []))
    diff = []
    for key in set(saved) | set(spec):
        if key in _RESUMABLE:
            continue
        if key == "optimizers":
            if not set(old) <= set(spec.get(key, [])):
                diff.append(key)
        elif key in _PER_OPTIMIZER:
            a, b = saved.get(key, {}), spec.get(key, {})
            if any(a.get(o) != b.get(o) for o in old):
                diff.append(key)
        elif saved.get(key) != spec.get(key):
            diff.append(key)
    return sorted(diff)


def _unchanged_result(out: Path, spec: dict[str, Any], analysis: dict[str, Any]) -> dict[str, Any] | None:
    """The saved results of a sweep continued with nothing new to run (the same settings, apart from the
    resumable ones, and the same analysis), so that passing a finished sweep again does not rewrite its
    results with another command line or machine, nor its plots; None when anything would change or a
    file of the report is missing."""
    path = out / "results.json"
    if not (path.exists() and (out / "report.md").exists()):
        return None
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return None
    same_spec = ({k: v for k, v in old.get("spec", {}).items() if k not in _RESUMABLE}
                 == {k: v for k, v in spec.items() if k not in _RESUMABLE})
    # through JSON, as the saved analysis went (tuples become lists; NaN never compares equal: rewrite)
    same = same_spec and old.get("analysis") == json.loads(json.dumps(analysis))
    if not same or not all((out / name).exists() for name in old.get("plots", [])):
        return None
    return old


# Defaults of main, and those of --quick (a smoke test of minutes); values given explicitly win over both.
DEFAULTS = {"steps": 400, "seeds": 3, "eval_every": 25, "eval_batches": 10}
QUICK_DEFAULTS = {"steps": 20, "seeds": 2, "eval_every": 5, "eval_batches": 2}
QUICK_LRS = {"adamw": [4e-3, 8e-3], "sophiag": [5e-4, 1e-3], "sophiah": [5e-4, 1e-3], "lion": [5e-4, 1e-3],
             "adahessian": [0.075, 0.15], "muon": [0.01, 0.02]}


def main(out_dir: str, *, preset: str = "tiny", optimizers: list[str] | None = None, steps: int | None = None,
         seeds: int | None = None, lrs: dict[str, list[float]] | None = None, rhos: list[float] | None = None,
         eval_every: int | None = None, eval_batches: int | None = None, data_root: str = "data",
         jobs: int | None = None, quick: bool = False, command: str = "sophia bench converge", qk_norm: bool = False,
         device: str = "cpu", muon_ns_dtype: str | None = None, batch_size: int | None = None,
         grad_accum: int | None = None) -> dict[str, Any]:
    """The sweep (module docstring). Unset counts take ``DEFAULTS``, or ``QUICK_DEFAULTS`` with ``quick``, which
    also means the one-layer model, no lr-grid growth, AdamW and SophiaG and small grids unless given."""
    if device not in DEVICES:
        raise TrainError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    gpus = visible_gpus() if device == "cuda" else None
    if jobs is None:
        jobs = len(gpus) if gpus else 2
    rhos_given = rhos
    given = {"steps": steps, "seeds": seeds, "eval_every": eval_every, "eval_batches": eval_batches}
    counts = {k: v if v is not None else (QUICK_DEFAULTS if quick else DEFAULTS)[k] for k, v in given.items()}
    steps, seeds, eval_every, eval_batches = (counts[k] for k in ("steps", "seeds", "eval_every", "eval_batches"))
    unused = sorted(set(lrs or {}) - set(optimizers or (["adamw", "sophiag"] if quick else OPTIMIZER_ORDER)))
    if unused:  # a grid for no optimizer of the sweep would be dropped without a word
        raise TrainError(f"--lrs gives a grid for {', '.join(unused)}, which the sweep does not run; add it to "
                         "--optimizers or leave out its grid")
    if quick:
        optimizers = optimizers or ["adamw", "sophiag"]
        lrs = {**QUICK_LRS, **(lrs or {})}
        rhos = rhos or [0.05, 0.2]
    optimizers = optimizers or list(OPTIMIZER_ORDER)
    # settings given for optimizers the sweep does not run: said, as train says it of its own
    if rhos_given is not None and not any(is_sophia(o) for o in optimizers):
        print("note: --rhos has no effect without a Sophia optimizer in the sweep", file=sys.stderr)
    if muon_ns_dtype is not None and "muon" not in optimizers:
        print("note: --muon-ns-dtype has no effect without muon in the sweep", file=sys.stderr)
    muon_ns_dtype = muon_ns_dtype or "bfloat16"
    if steps < 1 or seeds < 1 or jobs < 1 or eval_every < 1 or eval_batches < 1:
        raise TrainError("--steps, --seeds, --jobs, --eval-every and --eval-batches must be >= 1")
    # Everything that can be refused is refused before the folder, its sweep.json or any run is written.
    spec = build_spec(preset, optimizers, steps, seeds, lrs, rhos or list(DEFAULT_RHOS), eval_every, eval_batches,
                      data_root, jobs, quick, max_extend=0 if quick else 2, qk_norm=qk_norm, device=device,
                      muon_ns_dtype=muon_ns_dtype, batch_size=batch_size, grad_accum=grad_accum)
    out = Path(out_dir)
    check_writable_dir(out, "--out-dir")
    if Path(data_root).exists() and not Path(data_root).is_dir():
        raise TrainError(f"--data-root {data_root} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    saved_path = out / SWEEP_FILE
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        diff = spec_conflicts(saved, spec)
        if diff:
            raise TrainError(f"{out} holds a sweep with other settings ({', '.join(diff)} differ); continue it "
                             f"with the same options (more optimizers may be added: list the sweep's "
                             f"{','.join(saved.get('optimizers', []))} too) or choose another --out-dir")
    saved_path.write_text(json.dumps(spec, indent=2) + "\n")
    sweep = Sweep(out, spec, jobs, log=lambda msg: print(msg, file=sys.stderr, flush=True), gpus=gpus)
    sweep.plan()
    analysis = analyse(sweep)
    kept = _unchanged_result(out, spec, analysis)
    if kept is not None:
        # the report is rendered again from the saved results (its command line and machine are those of
        # the runs), so that a newer report layout still reaches it
        print(f"{out}: nothing new since its report was written; results.json and the plots are kept "
              f"as they are", file=sys.stderr, flush=True)
        text = report(kept)
        if (out / "report.md").read_text() != text:
            (out / "report.md").write_text(text)
        print(text)
        return kept
    machine = {**machine_info(), **({"gpus": len(gpus)} if gpus else {})}
    result = {"command": command, "machine": machine, "spec": spec, "analysis": analysis}
    result["plots"] = plot(result["analysis"], out, f"{preset}: validation loss at each optimizer's best setting",
                           device)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (out / "report.md").write_text(text)
    print(text)
    return result
