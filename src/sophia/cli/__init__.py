"""Command line: ``sophia train | sample | data prepare | compare | demo | bench step|overhead|converge|toy``. Thin.

Each command lives in its own module as a :class:`~sophia.cli.command.Command`: a function that adds its arguments
and one that runs it. :func:`main` parses, checks the command's extra is installed, and dispatches.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from sophia.cli import bench, compare, data, demo, sample, train
from sophia.cli.command import Call, Command, Group, UsageError, add_commands
from sophia.cli.extras import BENCH_MODULES, EXTRAS, LM_MODULES, missing_extra
from sophia.lm.config import TrainError

__all__ = ["BENCH_MODULES", "COMMANDS", "EXTRAS", "LM_MODULES", "main", "missing_extra"]

COMMANDS: tuple[Command | Group, ...] = (train.COMMAND, sample.COMMAND, data.GROUP, compare.COMMAND, demo.COMMAND,
                                         bench.GROUP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sophia", description="sophia-lab command line")
    add_commands(parser, COMMANDS, dest="command")
    args = parser.parse_args(argv)
    call = Call(command="sophia " + shlex.join(sys.argv[1:] if argv is None else argv),  # what the reports record
                whole_process=argv is None)
    sub = getattr(args, args.command, None)  # a group's chosen subcommand (its dest is the group's name)
    missing = missing_extra(args.command, sub if isinstance(sub, str) else None)
    if missing is not None:  # before any work: nothing computed, nothing written
        print(f"error: {missing}", file=sys.stderr)
        return 1
    try:
        return args.func(args, call)
    except UsageError as e:
        parser.error(str(e))
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
