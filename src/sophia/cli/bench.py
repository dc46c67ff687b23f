"""``sophia bench step | overhead | converge | toy``: the benchmarks, each writing a report and its results."""

from __future__ import annotations

import argparse

from sophia.cli.command import Call, Command, Group, UsageError
from sophia.lm.config import TrainError


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", required=True, help="where report.md and results.json go")
    p.add_argument("--preset", default=None, choices=["30m", "gpt2-small", "quick"], help="default 30m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=None, help="default 15")
    p.add_argument("--quick", action="store_true",
                   help="a tiny parameter set, seconds: --preset quick --rounds 5 (explicit ones win)")
    p.add_argument("--no-compiled", action="store_true", help="skip the compiled (fused) path")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out-dir")


def run_step(args: argparse.Namespace, call: Call) -> int:
    # --quick gives defaults; --preset and --rounds given explicitly win (resolved here, so quick=False)
    preset = args.preset or ("quick" if args.quick else "30m")
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 15)
    if rounds < 2:
        raise UsageError("--rounds must be >= 2 (the report gives medians and interquartile ranges)")
    from sophia.bench.step import main as step_main

    step_main(args.out_dir, preset, args.dtype, rounds, False, not args.no_compiled,
              command=call.command, device=args.device, overwrite=args.overwrite)
    return 0


_OVERHEAD_OVERRIDES = (("--device", str), ("--dtype", str), ("--corpus", str), ("--tokenizer", str),
                       ("--data-root", str), ("--batch-size", int), ("--grad-accum", int))


def add_overhead_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", required=True)
    p.add_argument("--presets", default=None, help="comma-separated (default tiny,small)")
    p.add_argument("--steps", type=int, default=None, help="rounds; a multiple of 10 (default 100)")
    p.add_argument("--quick", action="store_true",
                   help="a one-layer model, by default of the tiny preset for 20 rounds (--presets and --steps "
                        "given explicitly win)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out-dir")
    group = p.add_argument_group("overrides of the presets' settings")
    for flag, kind in _OVERHEAD_OVERRIDES:
        group.add_argument(flag, type=kind, default=None)
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)


def run_overhead(args: argparse.Namespace, call: Call) -> int:
    if args.steps is not None and (args.steps < 10 or args.steps % 10):
        raise UsageError("--steps must be a positive multiple of 10")
    from sophia.bench.overhead import main as overhead_main

    overrides = {k: getattr(args, k) for k in ("device", "dtype", "corpus", "tokenizer", "data_root", "batch_size",
                                               "grad_accum", "compile")}
    presets = [p for p in args.presets.split(",") if p] if args.presets is not None else None
    overhead_main(args.out_dir, presets, args.steps, args.quick, command=call.command, overrides=overrides,
                  overwrite=args.overwrite)
    return 0


def add_converge_arguments(p: argparse.ArgumentParser) -> None:
    from sophia.lm.muon import MUON_NS_DTYPES

    p.add_argument("--out-dir", required=True, help="the sweep's folder; a rerun continues it (finished runs kept)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--optimizers", default=None,
                   help="comma-separated (default: adamw,lion,adahessian,sophiah,sophiag)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per run: the token budget (default 400; --quick 20)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds at each optimizer's best setting (default 3; --quick 2)")
    p.add_argument("--lrs", action="append", default=[], metavar="OPT=LR,LR,...",
                   help="an optimizer's starting lr grid (repeatable); default: built-in grids for tiny, the "
                        "preset's lr x 1/2, 1, 2 for other presets")
    p.add_argument("--rhos", default=None, help="Sophia's rho grid (default 0.01,0.05,0.2)")
    p.add_argument("--eval-every", type=int, default=None, help="default 25; --quick 5")
    p.add_argument("--eval-batches", type=int, default=None, help="default 10; --quick 2")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time: on the CPU one thread each (default 2); on CUDA one GPU each, in turn "
                        "(default: one per visible GPU)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the runs train (default cpu): cuda spreads them over the visible GPUs")
    p.add_argument("--data-root", default="data")
    p.add_argument("--quick", action="store_true",
                   help="a one-layer model, no lr-grid growth, and by default 20 steps, 2 seeds, AdamW and SophiaG, "
                        "small grids (options given explicitly win)")
    p.add_argument("--qk-norm", action="store_true", help="every optimizer's model with QK-norm (train --qk-norm)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per micro-batch for every run (train --batch-size; default the preset's): "
                        "with --grad-accum, the tokens per step")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per step for every run (train --grad-accum; default the preset's)")
    p.add_argument("--muon-ns-dtype", default=None, choices=MUON_NS_DTYPES,
                   help="Muon's Newton-Schulz iteration (train --muon-ns-dtype; default torch's bfloat16): float32 "
                        "on a CPU without native bfloat16 matmuls")
    p.add_argument("--log-to", default=None, metavar="tensorboard,wandb",
                   help="every run also logs to these (train --log-to; W&B runs grouped by the sweep's folder name, "
                        "TensorBoard: tensorboard --logdir OUT_DIR/runs)")
    p.add_argument("--wandb-project", default=None, help="the runs' W&B project (train --wandb-project)")


def run_converge(args: argparse.Namespace, call: Call) -> int:
    from sophia.bench.converge import main as converge_main

    converge_main(args.out_dir, preset=args.preset, optimizers=_csv(args.optimizers, str), steps=args.steps,
                  seeds=args.seeds, lrs=_grids(args.lrs), rhos=_csv(args.rhos, float), eval_every=args.eval_every,
                  eval_batches=args.eval_batches, data_root=args.data_root, jobs=args.jobs, quick=args.quick,
                  command=call.command, qk_norm=args.qk_norm, device=args.device,
                  muon_ns_dtype=args.muon_ns_dtype, batch_size=args.batch_size, grad_accum=args.grad_accum,
                  log_to=args.log_to, wandb_project=args.wandb_project)
    return 0


def _csv(text: str | None, kind):
    if text is None:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TrainError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from None


def _grids(items: list[str]) -> dict[str, list[float]] | None:
    grids = {}
    for item in items:
        opt, sep, values = item.partition("=")
        grid = _csv(values, float) if sep else None
        if not grid:
            raise TrainError(f"--lrs takes OPT=LR,LR,..., got {item!r}")
        grids[opt.strip()] = grid
    return grids or None


def add_toy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", required=True)
    p.add_argument("--quick", action="store_true", help="4 lrs, at most 100 steps: seconds")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out-dir")


def run_toy(args: argparse.Namespace, call: Call) -> int:
    from sophia.bench.toy import main as toy_main

    toy_main(args.out_dir, quick=args.quick, command=call.command, overwrite=args.overwrite)
    return 0


GROUP = Group("bench", "benchmarks", "bench", (
    Command("step", "the cost of one optimizer step, side by side", add_step_arguments, run_step),
    Command("overhead", "wall-clock cost of the Hessian estimate per training step", add_overhead_arguments,
            run_overhead),
    Command("converge", "steps, compute and time to AdamW's loss, every optimizer tuned alike",
            add_converge_arguments, run_converge),
    Command("toy", "GD, Adam, SignGD, Newton and SophiaG on small problems with exact curvature", add_toy_arguments,
            run_toy),
))
