"""What a convergence sweep is: its settings (``build_spec``, written to ``sweep.json``), the grids it starts from,
the checks made before any run, which saved settings may differ when a sweep is continued, and one run's
``Setting``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sophia.lm.config import TrainError, resolve_config
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

# Defaults of main, and those of --quick (a smoke test of minutes); values given explicitly win over both.
DEFAULTS = {"steps": 400, "seeds": 3, "eval_every": 25, "eval_batches": 10}
QUICK_DEFAULTS = {"steps": 20, "seeds": 2, "eval_every": 5, "eval_batches": 2}
QUICK_LRS = {"adamw": [4e-3, 8e-3], "sophiag": [5e-4, 1e-3], "sophiah": [5e-4, 1e-3], "lion": [5e-4, 1e-3],
             "adahessian": [0.075, 0.15], "muon": [0.01, 0.02]}


@dataclass(frozen=True)
class Setting:
    """One run of a sweep; its ``name`` is the run's folder under ``runs/``.

    >>> Setting("sophiag", 5e-4, 0.05, 1).name
    'sophiag-lr0.0005-rho0.05-s1'
    >>> Setting("adamw", 1.6e-2, None, 0).name
    'adamw-lr0.016-s0'
    """

    optimizer: str
    lr: float
    rho: float | None
    seed: int

    @property
    def name(self) -> str:
        rho = f"-rho{self.rho:g}" if self.rho is not None else ""
        return f"{self.optimizer}-lr{self.lr:g}{rho}-s{self.seed}"


def is_sophia(optimizer: str) -> bool:
    return optimizer.startswith("sophia")


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
        # as train_argv passes it: Muon's grid is its Muon lr; the others' lr with min-lr a tenth of it
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
