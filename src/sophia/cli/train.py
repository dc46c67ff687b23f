"""``sophia train``: pre-train a GPT with an optimizer of the registry, or (``--dry-run``) print its plan.

The options come from :class:`~sophia.lm.config.TrainConfig`'s fields: each setting's help text, and what the
command says about it, live on the field (:func:`sophia.lm.config.setting`)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

from sophia.cli.command import Call, Command
from sophia.lm.config import TrainConfig, TrainError, flag, unused_settings

# A field's type (a string, under ``from __future__ import annotations``) -> what its option reads; bools are flags.
_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float, "str | None": str}
_FLAGS = ("bool", "bool | None")


def add_arguments(p: argparse.ArgumentParser) -> None:
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
        if f.metadata["own_option"]:
            continue
        help_text = f.metadata["help"]
        help_text = f"{help_text}{'; ' if help_text else ''}default: the preset's, else {f.default!r}"
        if f.type in _FLAGS:
            group.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(flag(f.name), dest=f.name, type=_TYPES[f.type], default=None,
                               metavar=f.type.split()[0].upper(), help=help_text)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every TrainConfig setting as the command line gives it: None where it is not given (the preset's value, or
    the saved one when resuming). :func:`sophia.lm.config.to_argv` is the way back."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig)}


def run(args: argparse.Namespace, call: Call) -> int:
    rc = _train(args, whole_process=call.whole_process)
    if call.whole_process:
        _exit_rank(rc)
    return rc


def _train(args: argparse.Namespace, whole_process: bool = False) -> int:
    import json
    import os

    from sophia.lm.checkpoint import has_checkpoint, load_checkpoint
    from sophia.lm.config import check_world_size, resolve_config, resume_config
    from sophia.lm.train import StopRequestedError, format_summary, train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if not f.metadata["own_option"]}
    if overrides.get("corpus") is not None:
        overrides["corpus"] = resolved_corpus(overrides["corpus"])
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
    for key in unused_settings(cfg.optimizer, overrides):
        print(f"note: {flag(key)} has no effect with --optimizer {cfg.optimizer}", file=sys.stderr)
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


def resolved_corpus(corpus: str) -> str:
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
    from sophia.lm.device import resolve_device
    from sophia.lm.memory import GiB, device_memory_bytes, plan_summary
    from sophia.lm.train import _vocab_guess, use_bf16

    meta = prepared_meta(cfg.corpus)
    vocab = meta["vocab_size"] if meta is not None else _vocab_guess(cfg.tokenizer)
    # the spec only: a plan may be for CUDA devices this machine lacks
    device_type = resolve_device(cfg.device, allow_auto=True, check_machine=False).type
    if cfg.device_memory_gib:
        have = int(cfg.device_memory_gib * GiB)
    elif device_type == "cpu" or torch.cuda.is_available():
        have = device_memory_bytes(torch.device(device_type))
    else:
        have = None
    return plan_summary(cfg, world_size=world, device_type=device_type, device_bytes=have,
                        bf16=use_bf16(cfg, device_type), vocab=vocab)


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


COMMAND = Command("train", "pre-train a GPT with an optimizer of the registry", add_arguments, run)
