"""Running a sweep's settings: each one a ``sophia train`` process writing into ``runs/<setting>/``, its outcome
kept as that folder's ``result.json``, at most ``jobs`` at a time (on a CUDA sweep each on one GPU, handed out in
turn), in the order the tuning search asks for them."""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from sophia.bench.converge.search import TuningSearch
from sophia.bench.converge.spec import Setting
from sophia.fileio import atomic_write_json
from sophia.lm.checkpoint import has_checkpoint
from sophia.lm.config import TrainError, to_argv
from sophia.lm.metrics import read_metrics

RESULT_FILE = "result.json"


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def visible_gpus() -> list[str]:
    """The GPUs a CUDA sweep hands its runs to: the entries of CUDA_VISIBLE_DEVICES where it is set, else
    0 .. device_count - 1."""
    import torch

    if not torch.cuda.is_available():
        raise TrainError("bench converge --device cuda: no CUDA device is visible (use --device cpu)")
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in env.split(",") if x.strip()] if env else []
    return ids[: torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def train_argv(spec: dict[str, Any], s: Setting, run_dir: Path, device: str, resume: bool,
               tracking: dict[str, Any] | None = None) -> list[str]:
    """The ``sophia train`` command line of setting ``s`` of the sweep ``spec``, writing into ``run_dir``; with
    ``resume``, the one that continues it from its checkpoint. ``tracking``: the ``--log-to`` settings (``log_to``,
    ``wandb_project``, ``run_group``), passed alike to new and resumed runs (a resume may change them)."""
    where = {"out_dir": str(run_dir), "progress": False, "device": device, "data_root": spec["data_root"],
             **(tracking or {})}
    head = [sys.executable, "-m", "sophia", "train"]
    if resume:
        return head + to_argv(where) + ["--resume"]
    if s.optimizer == "muon":  # the swept lr is Muon's; the AdamW part's is fixed (the package docstring)
        lr = spec["adamw_part_lr"]["muon"]
        lrs = {"muon_lr": s.lr, "lr": lr, "min_lr": lr / 10, "muon_ns_dtype": spec.get("muon_ns_dtype")}
    else:
        lrs = {"lr": s.lr, "min_lr": s.lr / 10}
    return head + to_argv({**where, "preset": spec["preset"], "optimizer": s.optimizer, **lrs, "seed": s.seed,
                           "max_steps": spec["steps"], "eval_every": spec["eval_every"],
                           "eval_batches": spec["eval_batches"], "checkpoint_every": spec["checkpoint_every"],
                           "log_every": spec["eval_every"], "warmup_steps": spec["warmup_steps"], "rho": s.rho,
                           **spec["model"]})


class Sweep:
    """Runs settings as subprocesses, at most ``jobs`` at a time, skipping finished ones."""

    def __init__(self, out: Path, spec: dict[str, Any], jobs: int, log: Callable[[str], Any] = print,
                 gpus: list[str] | None = None, tracking: dict[str, Any] | None = None) -> None:
        self.out, self.spec, self.jobs, self.log = out, spec, jobs, log
        self.tracking = tracking  # train_argv's: the runs' --log-to, not part of the sweep's settings
        self.device = spec.get("device", "cpu")
        # GPU slots: the visible GPUs in turn, one slot per job (so jobs beyond the GPUs share them)
        self._slots: queue.SimpleQueue[str] = queue.SimpleQueue()
        pool = gpus or ["0"]
        for i in range(jobs if self.device == "cuda" else 0):
            self._slots.put(pool[i % len(pool)])
        self.runs_dir = out / "runs"
        self.results: dict[Setting, dict[str, Any]] = {}
        self._lock = threading.Lock()

    # -- one run ------------------------------------------------------------------------------
    def run_dir(self, s: Setting) -> Path:
        return self.runs_dir / s.name

    def command(self, s: Setting, resume: bool) -> list[str]:
        return train_argv(self.spec, s, self.run_dir(s), self.device, resume, self.tracking)

    def execute(self, s: Setting) -> dict[str, Any]:
        d = self.run_dir(s)
        done = d / RESULT_FILE
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
        atomic_write_json(done, result, indent=None)  # one line, as result.json always was
        self.log(f"done {s.name}: " + ("diverged" if diverged else f"val loss {result['final_val_loss']:.4f}"))
        return result

    # -- the procedure --------------------------------------------------------------------------
    def _searches(self) -> dict[str, TuningSearch]:
        return {opt: TuningSearch.from_spec(self.spec, opt) for opt in self.spec["optimizers"]}

    def _scores(self) -> dict[Setting, float]:
        return {s: r["final_val_loss"] for s, r in self.results.items()}

    def plan(self) -> None:
        """Run every optimizer's tuning search (lr grid with edge growth, rho grid, seeds) on a shared pool: an
        optimizer's next settings are asked for once all of its running ones have finished."""
        searches = self._searches()
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            pending: dict[Future, Setting] = {}

            def submit_next(opt: str) -> None:
                for s in searches[opt].next_settings(self._scores()):
                    pending[pool.submit(self.execute, s)] = s

            for opt in self.spec["optimizers"]:
                submit_next(opt)
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
                    if error is None and not any(p.optimizer == s.optimizer for p in pending.values()):
                        submit_next(s.optimizer)
            if error is not None:
                raise error

    def best_settings(self) -> dict[str, tuple[float, float | None]]:
        """Per optimizer, the setting the tuning chose (and ran at the fresh seeds)."""
        scores = self._scores()
        chosen = {opt: search.progress(scores).chosen for opt, search in self._searches().items()}
        return {opt: c for opt, c in chosen.items() if c is not None}
