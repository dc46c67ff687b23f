"""``sophia compare``: runs side by side, as curves (a PNG) and a Markdown table.

A folder is a run (``sophia train``'s ``--out-dir``: its ``metrics.jsonl``) or a ``bench converge`` sweep (its
``sweep.json``: one curve per finished run, those under ``runs/`` with a ``result.json``). The plot has the
validation loss, the training loss and the lr against ``--x`` (step, tokens, training seconds or forward/backward
passes, Hessian estimates counted), and the largest attention logit over the layers when the runs logged it.

The table: per run its optimizer, lr, steps, final and best validation loss, the point where its validation loss
first reaches the *target* (the lowest final validation loss among the runs) in steps, tokens and passes, linearly
interpolated between the two evaluations around it (as ``bench converge`` computes it,
:func:`sophia.bench.converge.analysis.crossing`; the first evaluation when it is already at or below), and its
speed: the steady tokens per second and MFU ``sophia train`` reported at the end, or for a run without that summary
(unfinished, or stopped) the median over its logged windows.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sophia.bench.converge.analysis import crossing
from sophia.bench.converge.runner import RESULT_FILE
from sophia.bench.converge.spec import SWEEP_FILE
from sophia.fileio import atomic_write_bytes
from sophia.lm.config import TrainError, check_writable_dir
from sophia.lm.metrics import METRICS, read_metrics

X_AXES = {"step": ("step", "step"), "tokens": ("tokens", "tokens"),
          "seconds": ("elapsed", "training seconds (evaluation and checkpoints left out)"),
          "passes": ("passes", "forward/backward passes (Hessian estimates counted)")}
FORMATS = (".png", ".svg", ".pdf")


@dataclass
class Run:
    """One run's events, as :func:`sophia.lm.metrics.read_metrics` gives them."""

    label: str
    path: Path
    events: list[dict[str, Any]]
    evals: list[dict[str, Any]] = field(init=False)
    trains: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.evals = [e for e in self.events if e["event"] == "eval"]
        self.trains = [e for e in self.events if e["event"] == "train"]

    @property
    def config(self) -> dict[str, Any]:
        return next((e.get("config", {}) for e in self.events if e["event"] == "start"), {})

    @property
    def optimizer(self) -> str:
        return self.config.get("optimizer", "?")

    @property
    def lr(self) -> float | None:
        """The peak lr: the config's, or the last one a resume set."""
        lr = self.config.get("lr")
        for e in self.events:
            if e["event"] == "resume" and "lr" in e.get("changes", {}):
                lr = e["changes"]["lr"]["now"]
        return lr

    @property
    def steps(self) -> int:
        return max((e["step"] for e in self.events), default=0)

    @property
    def final(self) -> float | None:
        return self.evals[-1]["val_loss"] if self.evals else None

    @property
    def best(self) -> float | None:
        return min((e["val_loss"] for e in self.evals), default=None)

    def speed(self, key: str) -> float | None:
        """``tokens_per_s`` or ``mfu``: the last summary's steady value, else the median of the logged windows."""
        summaries = [e for e in self.events if e["event"] == "summary"]
        if summaries and f"steady_{key}" in summaries[-1]:
            return summaries[-1][f"steady_{key}"]
        values = [e[key] for e in self.trains if key in e]
        return statistics.median(values) if values else None


def _is_run(folder: Path) -> bool:
    return (folder / METRICS).is_file()


def load_runs(folders: list[str | Path]) -> list[Run]:
    """The runs of ``folders`` (run folders, and the finished runs of bench converge folders); a TrainError naming
    every folder that is neither."""
    found: list[tuple[Path, Path]] = []  # (the folder given, the run folder)
    bad = []
    for given in map(Path, folders):
        if _is_run(given):
            found.append((given, given))
        elif (given / SWEEP_FILE).is_file():
            runs = sorted(d for d in (given / "runs").glob("*") if (d / RESULT_FILE).is_file() and _is_run(d))
            if not runs:
                bad.append(f"{given} (a bench converge folder without a finished run yet)")
            found += [(given, d) for d in runs]
        elif not given.exists():
            bad.append(f"{given} (it does not exist)")
        else:
            bad.append(f"{given} (no {METRICS} and no {SWEEP_FILE})")
    if bad:
        raise TrainError(f"not a run folder (sophia train --out-dir) or a bench converge folder: {'; '.join(bad)}")
    labels = [d.resolve().name if given == d else f"{given.resolve().name}/{d.name}" for given, d in found]
    if len(set(labels)) < len(labels):  # the same name twice: the paths as given
        labels = [str(d) for _, d in found]
    runs = []
    for label, (_, d) in zip(labels, found):
        try:
            runs.append(Run(label, d, read_metrics(d)))
        except OSError as e:
            raise TrainError(f"{d / METRICS}: {e.strerror or e}") from None
    return runs


def target(runs: list[Run]) -> tuple[float, Run] | None:
    """The lowest final validation loss among the runs (finite ones), and its run."""
    finals = [(r.final, i) for i, r in enumerate(runs) if r.final is not None and math.isfinite(r.final)]
    if not finals:
        return None
    loss, i = min(finals)
    return loss, runs[i]


def rows(runs: list[Run]) -> list[dict[str, Any]]:
    """The table's numbers, one dict per run (None: not available)."""
    goal = target(runs)
    out = []
    for r in runs:
        reached = crossing(r.evals, goal[0]) if goal is not None and r.evals else None
        out.append({"run": r.label, "optimizer": r.optimizer, "lr": r.lr, "steps": r.steps, "final_val_loss": r.final,
                    "best_val_loss": r.best, "target_steps": reached["steps"] if reached else None,
                    "target_tokens": reached["tokens"] if reached else None,
                    "target_passes": reached["passes"] if reached else None,
                    "tokens_per_s": r.speed("tokens_per_s"), "mfu": r.speed("mfu")})
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def table(runs: list[Run]) -> str:
    """The Markdown table, with a line that says what the target is."""
    goal = target(runs)
    head = ("| run | optimizer | lr | steps | final val loss | best val loss | steps to target | tokens to target "
            "| passes to target | tokens/s | MFU |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row in rows(runs):
        lines.append("| " + " | ".join([
            row["run"], row["optimizer"], _fmt(row["lr"], "g"), str(row["steps"]), _fmt(row["final_val_loss"], ".4f"),
            _fmt(row["best_val_loss"], ".4f"), _fmt(row["target_steps"], ".1f"), _fmt(row["target_tokens"], ",.0f"),
            _fmt(row["target_passes"], ".1f"), _fmt(row["tokens_per_s"], ",.0f"), _fmt(row["mfu"], ".2%")]) + " |")
    if goal is None:
        lines.append("\nNo run has a finite validation loss yet: no target.")
    else:
        lines.append(f"\nTarget: {goal[0]:.4f}, the final validation loss of {goal[1].label} (the lowest); "
                     "\"to target\": where a run's validation loss first reaches it, interpolated linearly between "
                     "evaluations; "
                     "-: never. Passes: training forward/backward passes plus Hessian estimates. tokens/s and MFU: "
                     "the steady speed the run reported at its end (the median of its logged windows if it has not "
                     "finished).")
    return "\n".join(lines)


def _x(event: dict[str, Any], key: str) -> float:
    return event["train_passes"] + event["hessian_passes"] if key == "passes" else event[key]


def _top(series: list[list[float]]) -> float | None:
    """An upper y-limit that leaves out each curve's first tenth (the initial loss would flatten the rest)."""
    tails = [v for ys in series for v in ys[len(ys) // 10:] if math.isfinite(v)]
    return max(tails) if tails else None


def plot(runs: list[Run], out: Path, x: str = "step") -> None:
    """The curves of ``runs`` against ``x`` into ``out`` (written all at once: a failed plot leaves no file)."""
    from sophia.plotting import pyplot

    key, xlabel = X_AXES[x]
    plt = pyplot()
    attention = any("attn_max_logit" in e for r in runs for e in r.evals)
    panels = [("val_loss", "evals", "validation loss"), ("train_loss", "trains", "training loss"),
              ("lr", "trains", "lr")]
    if attention:
        panels.append(("attn_max_logit", "evals", "largest attention logit (max over layers)"))
    cols = 2 if len(panels) == 4 else 3
    fig, axes = plt.subplots(len(panels) // cols, cols, figsize=(6 * cols, 4.2 * (len(panels) // cols)),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (field_name, which, ylabel) in zip(axes.flat, panels):
        drawn = []
        for i, r in enumerate(runs):
            events = [e for e in getattr(r, which) if field_name in e]
            xs = [_x(e, key) for e in events]
            ys = [max(e[field_name], default=math.nan) if field_name == "attn_max_logit" else e[field_name]
                  for e in events]
            if not xs:
                continue
            style = {"marker": "o", "ms": 3} if which == "evals" else {"lw": 1}
            ax.plot(xs, ys, color=colors[i % len(colors)], label=f"{r.label} ({r.optimizer}, lr {_fmt(r.lr, 'g')})",
                    **style)
            drawn.append(ys)
        if field_name.endswith("loss"):
            top = _top(drawn)
            lows = [v for ys in drawn for v in ys if math.isfinite(v)]
            if top is not None and lows and top > min(lows):
                pad = 0.05 * (top - min(lows))
                ax.set_ylim(min(lows) - pad, top + pad)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel)
        ax.grid(alpha=0.3)
    goal = target(runs)
    if goal is not None:
        axes.flat[0].axhline(goal[0], color="grey", ls=":", lw=1, label=f"target {goal[0]:.4f}")
    axes.flat[0].legend(fontsize=7 if len(runs) < 8 else 5)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=out.suffix[1:].lower(), dpi=120)
    plt.close(fig)
    atomic_write_bytes(out, lambda f: f.write(buffer.getvalue()))
    umask = os.umask(0)  # the temporary file's 0600: the user's own default instead, as for any file they write
    os.umask(umask)
    out.chmod(0o666 & ~umask)


def check_out(out: Path) -> None:
    """``--out`` is a file this command may write (an existing one is replaced: it is the output asked for)."""
    if out.is_dir():
        raise TrainError(f"--out {out} is a folder; give a file name such as {out / 'compare.png'}")
    if out.suffix.lower() not in FORMATS:
        raise TrainError(f"--out {out}: give a file name ending in {', '.join(FORMATS)}")
    check_writable_dir(out.parent, "--out")


def main(folders: list[str], out: str | None = None, x: str = "step", as_json: bool = False) -> str:
    """Read the runs, write the plot (when ``out`` is given), return the table (or with ``as_json``, the rows as
    JSON). Everything is checked before anything is written."""
    if x not in X_AXES:
        raise TrainError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    if out is not None:
        check_out(Path(out))
    runs = load_runs(folders)
    if out is not None:
        plot(runs, Path(out), x)
    return json.dumps(rows(runs), indent=2) if as_json else table(runs)


__all__ = ["X_AXES", "Run", "load_runs", "main", "plot", "rows", "table", "target"]
