"""``sophia bench converge``: steps, compute and time to the same validation loss, tuned alike.

Every optimizer gets the same tuning procedure on the same preset, token budget and schedule
(warm-up then cosine to lr/10):

1. an lr grid (log-spaced, factor 2) at seed 0; while the best lr sits at an edge of the grid,
   the grid grows by one point on that side (at most ``max_extend`` times);
2. for Sophia only, a rho grid at its best lr;
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

The parts: ``spec`` (the sweep's settings and checks), ``search`` (the tuning procedure, pure: settings out,
finished results in), ``runner`` (each setting a ``sophia train`` process, the job and GPU-slot queue),
``analysis`` and ``report`` (plots and markdown); ``main`` here ties them together.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sophia.bench.converge.analysis import analyse, crossing, mean_curve
from sophia.bench.converge.report import plot, report
from sophia.bench.converge.runner import Sweep, train_argv, visible_gpus
from sophia.bench.converge.search import Progress, TuningSearch
from sophia.bench.converge.spec import (
    _RESUMABLE,
    DEFAULT_LRS,
    DEFAULT_RHOS,
    DEFAULTS,
    DEVICES,
    NAMES,
    OPTIMIZER_ORDER,
    PRESET_GRID,
    QUICK_DEFAULTS,
    QUICK_LRS,
    SWEEP_FILE,
    Setting,
    build_spec,
    is_sophia,
    spec_conflicts,
)
from sophia.bench.machine import machine_info
from sophia.fileio import atomic_write_json, atomic_write_text
from sophia.lm.config import TrainError, check_writable_dir


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


def _tracking(out_dir: str, log_to: str | None, wandb_project: str | None) -> dict[str, Any] | None:
    """The runs' tracking settings, checked as ``sophia train`` checks them (names, installed packages)."""
    from sophia.lm.config import TrainConfig

    if log_to is None:
        if wandb_project is not None:
            print("note: --wandb-project has no effect without --log-to wandb", file=sys.stderr)
        return None
    tracking = {"log_to": log_to, "run_group": Path(out_dir).resolve().name}
    if wandb_project is not None:
        tracking["wandb_project"] = wandb_project
    TrainConfig(**tracking).validate()
    return tracking


def main(out_dir: str, *, preset: str = "tiny", optimizers: list[str] | None = None, steps: int | None = None,
         seeds: int | None = None, lrs: dict[str, list[float]] | None = None, rhos: list[float] | None = None,
         eval_every: int | None = None, eval_batches: int | None = None, data_root: str = "data",
         jobs: int | None = None, quick: bool = False, command: str = "sophia bench converge", qk_norm: bool = False,
         device: str = "cpu", muon_ns_dtype: str | None = None, batch_size: int | None = None,
         grad_accum: int | None = None, log_to: str | None = None,
         wandb_project: str | None = None) -> dict[str, Any]:
    """The sweep (module docstring). Unset counts take ``DEFAULTS``, or ``QUICK_DEFAULTS`` with ``quick``, which
    also means the one-layer model, no lr-grid growth, AdamW and SophiaG and small grids unless given.
    ``log_to``/``wandb_project``: every run's ``sophia train --log-to``/``--wandb-project``, its W&B group the
    sweep's folder name (not part of the sweep's settings: a continued sweep may change them)."""
    if device not in DEVICES:
        raise TrainError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    tracking = _tracking(out_dir, log_to, wandb_project)
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
    atomic_write_json(saved_path, spec)
    sweep = Sweep(out, spec, jobs, log=lambda msg: print(msg, file=sys.stderr, flush=True), gpus=gpus,
                  tracking=tracking)
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
            atomic_write_text(out / "report.md", text)
        print(text)
        return kept
    machine = {**machine_info(), **({"gpus": len(gpus)} if gpus else {})}
    result = {"command": command, "machine": machine, "spec": spec, "analysis": analysis}
    result["plots"] = plot(result["analysis"], out, f"{preset}: validation loss at each optimizer's best setting",
                           device)
    atomic_write_json(out / "results.json", result)
    text = report(result)
    atomic_write_text(out / "report.md", text)
    print(text)
    return result


__all__ = ["DEFAULTS", "DEFAULT_LRS", "DEFAULT_RHOS", "DEVICES", "NAMES", "OPTIMIZER_ORDER", "PRESET_GRID",
           "QUICK_DEFAULTS", "QUICK_LRS", "SWEEP_FILE", "Progress", "Setting", "Sweep", "TuningSearch", "analyse",
           "build_spec", "crossing", "is_sophia", "main", "mean_curve", "plot", "report", "spec_conflicts",
           "train_argv", "visible_gpus"]
