"""``sophia demo``: the main job, SophiaG and AdamW on the tiny preset side by side (:mod:`sophia.demo`)."""

from __future__ import annotations

import argparse

from sophia.cli.command import Call, Command, UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--corpus", default=None, help="default: the preset's (Shakespeare)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--eval-batches", type=int, default=None, help="default: the preset's (20)")


def run(args: argparse.Namespace, call: Call) -> int:
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError("--max-steps must be >= 1")
    from sophia.cli.train import resolved_corpus
    from sophia.demo import main as demo_main

    corpus = resolved_corpus(args.corpus) if args.corpus is not None else None
    return demo_main(max_steps=args.max_steps, out_dir=args.out_dir, corpus=corpus, data_root=args.data_root,
                     eval_batches=args.eval_batches)


COMMAND = Command("demo", "the main job: SophiaG and AdamW on the tiny preset, side by side", add_arguments, run)
