"""``sophia sample``: text from a trained model, streamed as it is generated."""

from __future__ import annotations

import argparse

from sophia.cli.command import Call, Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", required=True)
    p.add_argument("--start", default="\n", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=300, help="per sample, 1 to 100000 (default 300)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="> 0 samples; 0: greedy, always the most likely token (default 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="0: no top-k filtering")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace, call: Call) -> int:
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


COMMAND = Command("sample", "text from a trained model", add_arguments, run)
