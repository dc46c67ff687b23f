"""``sophia compare``: runs side by side (curves in a PNG, a Markdown table on stdout); :mod:`sophia.compare`."""

from __future__ import annotations

import argparse
import sys

from sophia.cli.command import Call, Command

X_AXES = ("step", "tokens", "seconds", "passes")  # sophia.compare.X_AXES (imported only to run: it needs [lm])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folders", nargs="+", metavar="DIR",
                   help="a run folder (sophia train --out-dir, with its metrics.jsonl) or a bench converge folder "
                        "(sweep.json: each of its finished runs)")
    p.add_argument("--out", default=None, metavar="FILE.png",
                   help="where the plot goes (.png, .svg or .pdf; an existing file is replaced); without it, the "
                        "table only")
    p.add_argument("--x", default="step", choices=X_AXES,
                   help="the plot's x-axis: step (default), tokens, seconds (training time) or passes "
                        "(forward/backward, Hessian estimates counted)")
    p.add_argument("--json", action="store_true", help="print the table's numbers as JSON instead of Markdown")


def run(args: argparse.Namespace, call: Call) -> int:
    from sophia.compare import main

    print(main(args.folders, out=args.out, x=args.x, as_json=args.json))
    if args.out is not None:
        print(f"plot: {args.out}", file=sys.stderr)
    return 0


COMMAND = Command("compare", "runs side by side: loss curves (PNG) and a Markdown table", add_arguments, run)
