"""``make demo``: SophiaG and AdamW pre-train the ``tiny`` GPT on Shakespeare, side by side.

Same seed, data order, schedule and step budget for both; each uses the preset's settings for
it (untuned: `sophia bench converge` is where tuning happens). Prints a table of validation
losses and writes DIR/curves.png. Re-running continues or reuses the runs in DIR (nothing is
overwritten).
"""

from __future__ import annotations

from pathlib import Path

from sophia.lm.checkpoint import has_checkpoint, load_checkpoint, read_metrics
from sophia.lm.config import RESUME_CHANGEABLE, resolve_config, resume_config
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


def main(max_steps: int | None = None, out_dir: str = "runs/demo", corpus: str | None = None,
         data_root: str | None = None, eval_batches: int | None = None) -> int:
    root = Path(out_dir)
    summaries, events = {}, {}
    steps = max_steps or DEMO_STEPS
    for name in OPTIMIZERS:
        overrides = {"max_steps": steps, "eval_every": steps // 8 if steps >= 16 else steps,
                     "checkpoint_every": max(1, steps // 4), "corpus": corpus, "data_root": data_root,
                     "eval_batches": eval_batches}
        out = root / name
        resume = has_checkpoint(out)
        if resume:  # continue (or just report) the earlier demo run, with its own settings
            saved = load_checkpoint(out)["config"]
            cfg = resume_config(saved, {k: v for k, v in overrides.items() if k in RESUME_CHANGEABLE})
        else:
            cfg = resolve_config("tiny", name, overrides)
        cfg.out_dir = str(out)
        print(f"== {name}: {cfg.max_steps} steps, lr {cfg.lr:g}" + (" (resuming)" if resume else ""), flush=True)
        summaries[name] = train(cfg, resume=resume)
        print(format_summary(summaries[name]), flush=True)
        events[name] = read_metrics(Path(cfg.out_dir))
    eval_steps = sorted({e["step"] for e in events["adamw"] if e.get("event") == "eval"})
    table = {n: {e["step"]: e["val_loss"] for e in ev if e.get("event") == "eval"} for n, ev in events.items()}
    print("\nvalidation loss (tiny preset, byte-level Shakespeare, same seed and data)")
    print(f"{'step':>6} " + " ".join(f"{n:>8}" for n in OPTIMIZERS))
    for s in eval_steps:
        print(f"{s:>6} " + " ".join(f"{table[n].get(s, float('nan')):8.4f}" for n in OPTIMIZERS))
    print("\nforward/backward passes: " + ", ".join(
        f"{n} {summaries[n]['train_passes']} + {summaries[n]['hessian_passes']:g} Hessian" for n in OPTIMIZERS))
    png = root / "curves.png"
    plot_curves(events, png, "tiny GPT on Shakespeare: SophiaG vs AdamW")
    print(f"curves: {png}")
    return 0
