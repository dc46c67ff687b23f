"""Command line: ``sophia demo`` (more sub-commands arrive with the harness and benchmarks)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sophia", description="sophia-lab command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small model with SophiaG and AdamW side by side")
    demo.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        from sophia.demo import main as demo_main

        demo_main(steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
