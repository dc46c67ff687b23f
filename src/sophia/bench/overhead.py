"""``sophia bench overhead``: the wall-clock price of the Hessian estimate, per training step.

For each preset, AdamW, SophiaG (GNB refresh every k = 10 steps on the whole batch and on a
quarter of it) and SophiaH (Hutchinson every 10 steps) train side by side in one process: each
round runs one training step of every configuration in a shuffled order, so machine noise
hits all alike. The per-step cost is amortised from medians: a plain step plus 1/k of what a
refresh step adds (the paper claims under 5% over AdamW; users measured 10-15%); the extra
forward/backward passes per step come from the harness's own counters.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

from sophia.bench.machine import check_out_dir, machine_info, resolve_device, synchronize
from sophia.fileio import atomic_write_json, atomic_write_text
from sophia.lm.config import TrainConfig, TrainError, resolve_config
from sophia.lm.presets import QUICK_MODEL
from sophia.lm.train import Trainer

CONFIGS = (
    ("adamw", "adamw", {}),
    ("sophiag k=10", "sophiag", {"hessian_interval": 10}),
    ("sophiag k=10, 1/4 batch", "sophiag", {"hessian_interval": 10, "hessian_batch_fraction": 0.25}),
    ("sophiah k=10", "sophiah", {"hessian_interval": 10}),
)


def configs(preset: str, steps: int, out_dir: Path, quick: bool, seed: int = 0,
            overrides: dict | None = None) -> list[tuple[str, TrainConfig]]:
    """The training configurations measured for a preset (checked, nothing created)."""
    out = []
    for label, optimizer, extra in CONFIGS:
        settings = {**(QUICK_MODEL if quick else {}), **(overrides or {}), **extra, "max_steps": steps,
                    "progress": False, "eval_batches": 1, "seed": seed}
        cfg = resolve_config(preset, optimizer, settings)
        cfg.out_dir = str(out_dir / "runs" / f"{preset}-{label.replace(' ', '').replace(',', '-').replace('/', '')}")
        out.append((label, cfg))
    return out


def measure(preset: str, steps: int, out_dir: Path, quick: bool, seed: int = 0, log=print,
            overrides: dict | None = None) -> dict:
    trainers = []
    for label, cfg in configs(preset, steps, out_dir, quick, seed, overrides):
        trainer = Trainer(cfg, log=lambda m: None)
        trainer.setup()
        trainers.append((label, trainer))
    times: dict[str, list[float]] = {label: [] for label, _ in trainers}
    rng = random.Random(seed)
    for i in range(steps):
        order = trainers[:]
        rng.shuffle(order)
        for label, trainer in order:
            synchronize(trainer.device)
            t = time.perf_counter()
            trainer.train_step(i)
            synchronize(trainer.device)
            times[label].append(time.perf_counter() - t)
        if (i + 1) % 10 == 0:
            log(f"{preset}: {i + 1}/{steps} rounds")
    base = statistics.median(times["adamw"])
    rows = []
    for label, trainer in trainers:
        ts = times[label]
        k = trainer.cfg.hessian_interval
        if label.startswith("sophiag"):  # the refresh runs inside steps k-1, 2k-1, ...
            is_refresh = [j % k == k - 1 for j in range(len(ts))]
        elif label.startswith("sophiah"):  # before steps k, 2k, ...
            is_refresh = [j > 0 and j % k == 0 for j in range(len(ts))]
        else:
            is_refresh = [False] * len(ts)
        plain = statistics.median([t for t, r in zip(ts, is_refresh) if not r])
        refresh = [t for t, r in zip(ts, is_refresh) if r]
        refresh_med = statistics.median(refresh) if refresh else None
        # One refresh every k steps: the amortised cost of a step, from medians (robust to noise).
        amortised = plain + ((refresh_med - plain) / k if refresh_med is not None else 0.0)
        c = trainer.counters
        rows.append({"config": label, "mean_ms": statistics.fmean(ts) * 1e3, "median_plain_ms": plain * 1e3,
                     "median_refresh_ms": refresh_med * 1e3 if refresh_med is not None else None,
                     "amortised_ms": amortised * 1e3, "ratio_to_adamw": amortised / base,
                     "extra_passes_per_step": c["hessian_passes"] / max(1, c["train_passes"]),
                     "tokens_per_step": c["tokens"] / max(1, c["step"])})
    first = trainers[0][1]
    return {"preset": preset, "steps": steps, "parameters": first.raw_model.num_parameters(), "rows": rows,
            "device": str(first.device), "amp": str(first.amp_dtype), "compile": first.cfg.compile,
            "batch": f"{first.cfg.batch_size}x{first.cfg.block_size}x{first.cfg.grad_accum}"}


def report(result: dict) -> str:
    m = result["machine"]
    lines = ["# Hessian-estimate overhead per training step", "", f"Command: `{result['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, " + (f"{m['gpu']}, " if "gpu" in m else "")
             + f"torch {m['torch']} ({m['torch_threads']} threads).", "",
             "Each round runs one step of every configuration, shuffled. Per step, amortised: the median "
             "plain step plus (median refresh step - median plain step) / k; the ratio is to AdamW's median "
             "step. The plain mean is shown too.", ""]
    for p in result["presets"]:
        lines += [f"## {p['preset']} ({p['parameters'] / 1e6:.2f}M parameters, batch {p['batch']}, "
                  f"{p['steps']} steps, {p.get('device', 'cpu')}, {p.get('amp', 'float32')}"
                  + (", compiled" if p.get("compile") else "") + ")", "",
                  "| configuration | plain step ms | refresh step ms | per step, amortised | / AdamW | "
                  "mean ms | extra passes/step |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in p["rows"]:
            refresh = f"{r['median_refresh_ms']:.1f}" if r["median_refresh_ms"] is not None else "-"
            lines.append(f"| {r['config']} | {r['median_plain_ms']:.1f} | {refresh} | {r['amortised_ms']:.1f} | "
                         f"{r['ratio_to_adamw']:.3f}x | {r['mean_ms']:.1f} | {r['extra_passes_per_step']:.3f} |")
        lines.append("")
    lines += ["Extra passes: forward+backward pairs per training pass (GNB: one per refresh, scaled by the "
              "estimate batch; Sophia-H here: a forward and backward with graph plus the Hessian-vector "
              "product, counted as 2, on a fresh batch, every 10 steps)."]
    return "\n".join(lines) + "\n"


OUTPUTS = ("report.md", "results.json")


def main(out_dir: str, presets: list[str] | None = None, steps: int | None = None, quick: bool = False,
         command: str = "sophia bench overhead", overrides: dict | None = None, overwrite: bool = False) -> None:
    """``presets`` (default tiny and small) measured for ``steps`` rounds (default 100). ``quick``: the one-layer
    model, and by default the tiny preset for 20 rounds; presets and steps given explicitly are kept."""
    if presets is None:
        presets = ["tiny"] if quick else ["tiny", "small"]
    if steps is None:
        steps = 20 if quick else 100
    if not presets:
        raise TrainError("--presets names no preset")
    if steps < 10 or steps % 10:  # the refresh every k = 10 steps: whole periods
        raise TrainError(f"--steps must be a positive multiple of 10, got {steps}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    # Everything that can be refused is refused before a folder is created or a model built.
    out = Path(out_dir)
    for p in presets:
        for _, cfg in configs(p, steps, out, quick, overrides=given):
            resolve_device(cfg.device, allow_auto=True)
    check_out_dir(out, OUTPUTS, overwrite)
    result = {"command": command, "machine": machine_info(),
              "presets": [measure(p, steps, out, quick, log=lambda m: print(m, file=sys.stderr), overrides=given)
                          for p in presets]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    text = report(result)
    atomic_write_text(out / "report.md", text)
    print(text)
