"""``make demo``: SophiaG and AdamW pre-train the ``tiny`` GPT on Shakespeare, side by side.

Same seed, data order, schedule and step budget for both; each uses the preset's settings for
it (untuned: `sophia bench converge` is where tuning happens). Prints a table of validation
losses and writes DIR/curves.png. Re-running continues or reuses the runs in DIR with their saved
settings (nothing is overwritten); a setting given again is honoured where a resumed run may change it
(--data-root, a larger --max-steps) and refused where it may not (--corpus, --eval-batches).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sophia.lm.checkpoint import has_checkpoint, load_checkpoint
from sophia.lm.config import TrainConfig, resolve_config, resume_config
from sophia.lm.metrics import read_metrics
from sophia.lm.train import format_summary, train

OPTIMIZERS = ("sophiag", "adamw")


def plot_curves(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    from sophia.plotting import finish_axes, pyplot, save

    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for name, events in runs.items():
        evals = [e for e in events if e.get("event") == "eval"]
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], marker="o", ms=3, label=name)
    finish_axes(ax, "step", "validation loss", title, legend_size=None)
    save(fig, path)


DEMO_STEPS = 400
# The settings of the demo, the same for both runs: those the command line gives, and the schedule they imply.
DEMO_SETTINGS = ("corpus", "tokenizer", "data_root", "eval_batches", "max_steps", "eval_every", "checkpoint_every",
                 "lr_decay_steps")


def _given(max_steps: int | None, corpus: str | None, data_root: str | None,
           eval_batches: int | None) -> dict[str, Any]:
    """The settings this call asks for (None: not given)."""
    given: dict[str, Any] = {"corpus": corpus, "data_root": data_root, "eval_batches": eval_batches}
    if max_steps is not None:
        given.update(max_steps=max_steps, eval_every=max_steps // 8 if max_steps >= 16 else max_steps,
                     checkpoint_every=max(1, max_steps // 4))
    return given


def plan(root: Path, max_steps: int | None = None, corpus: str | None = None, data_root: str | None = None,
         eval_batches: int | None = None) -> dict[str, tuple[TrainConfig, bool, dict]]:
    """Each optimizer's run: its config, whether it continues a run in ``root``, and the schedule changes.

    A fresh demo takes the given settings over the defaults. Runs already in ``root`` keep their saved settings;
    a given one replaces a saved one where a resume may change it (e.g. a larger --max-steps continues them) and is
    refused otherwise (TrainError naming the setting, both values and another --out-dir), never ignored. A run
    missing beside an existing one (an interrupted demo) starts with the existing one's settings, so that the two
    stay comparable. Everything is checked before either run trains."""
    given = _given(max_steps, corpus, data_root, eval_batches)
    saved = {name: load_checkpoint(root / name)["config"] for name in OPTIMIZERS if has_checkpoint(root / name)}
    runs = {}
    for name in OPTIMIZERS:
        refusal = f"{root} holds a demo run with other settings"
        changes: dict = {}
        if name in saved:
            cfg = resume_config(saved[name], given, changes, refusal=refusal)
        elif saved:  # the other optimizer's run exists: this one starts from its demo settings
            base = next(iter(saved.values()))
            demo = {k: base[k] for k in DEMO_SETTINGS if k in base}
            start = resolve_config("tiny", name, demo).to_dict()
            cfg = resume_config(start, given, refusal=refusal)
        else:
            steps = max_steps or DEMO_STEPS
            cfg = resolve_config("tiny", name, {**_given(steps, corpus, data_root, eval_batches)})
        cfg.out_dir = str(root / name)
        runs[name] = (cfg, name in saved, changes)
    return runs


def _data_label(cfg: TrainConfig) -> str:
    if cfg.corpus == "shakespeare" and cfg.tokenizer == "byte":
        return "byte-level Shakespeare"
    return f"{Path(cfg.corpus).name if cfg.corpus not in ('shakespeare', 'openwebtext') else cfg.corpus}, " \
           f"{cfg.tokenizer} tokens"


def main(max_steps: int | None = None, out_dir: str = "runs/demo", corpus: str | None = None,
         data_root: str | None = None, eval_batches: int | None = None) -> int:
    root = Path(out_dir)
    runs = plan(root, max_steps, corpus, data_root, eval_batches)
    summaries, events = {}, {}
    for name, (cfg, resume, changes) in runs.items():
        print(f"== {name}: {cfg.max_steps} steps, lr {cfg.lr:g}" + (" (resuming)" if resume else ""), flush=True)
        summaries[name] = train(cfg, resume=resume, schedule_changes=changes)
        print(format_summary(summaries[name]), flush=True)
        events[name] = read_metrics(Path(cfg.out_dir))
    label = _data_label(runs["adamw"][0])
    eval_steps = sorted({e["step"] for e in events["adamw"] if e.get("event") == "eval"})
    table = {n: {e["step"]: e["val_loss"] for e in ev if e.get("event") == "eval"} for n, ev in events.items()}
    print(f"\nvalidation loss (tiny preset, {label}, same seed and data)")
    print(f"{'step':>6} " + " ".join(f"{n:>8}" for n in OPTIMIZERS))
    for s in eval_steps:
        print(f"{s:>6} " + " ".join(f"{table[n].get(s, float('nan')):8.4f}" for n in OPTIMIZERS))
    print("\nforward/backward passes: " + ", ".join(
        f"{n} {summaries[n]['train_passes']} + {summaries[n]['hessian_passes']:g} Hessian" for n in OPTIMIZERS))
    png = root / "curves.png"
    title = ("tiny GPT on Shakespeare" if label == "byte-level Shakespeare" else f"tiny GPT on {label}")
    plot_curves(events, png, f"{title}: SophiaG vs AdamW")
    print(f"curves: {png}")
    return 0
