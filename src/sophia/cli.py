"""Command line: ``sophia demo``, ``sophia bench step`` (more arrive with the harness)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sophia", description="sophia-lab command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small model with SophiaG and AdamW side by side")
    demo.add_argument("--steps", type=int, default=600)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    step = bench.add_parser("step", help="the cost of one optimizer step, side by side")
    step.add_argument("--out-dir", required=True, help="where report.md and results.json go")
    step.add_argument("--preset", default="30m", choices=["30m", "gpt2-small", "quick"])
    step.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    step.add_argument("--rounds", type=int, default=15)
    step.add_argument("--quick", action="store_true", help="a tiny parameter set, seconds")
    step.add_argument("--no-compiled", action="store_true", help="skip the compiled (fused) path")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        from sophia.demo import main as demo_main

        demo_main(steps=args.steps)
    elif args.command == "bench" and args.bench == "step":
        if args.rounds < 1:
            parser.error("--rounds must be >= 1")
        from sophia.bench.step import main as step_main

        step_main(args.out_dir, args.preset, args.dtype, args.rounds, args.quick, not args.no_compiled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
