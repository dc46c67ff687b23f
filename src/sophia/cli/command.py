"""What a command of ``sophia`` is: a name, its help, a function that adds its arguments and one that runs it."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Call:
    """How a command was called: ``command``, the command line the reports record; ``whole_process``, whether this
    process exists for the command (``sophia ...``, not ``main([...])`` from Python)."""

    command: str
    whole_process: bool


class UsageError(Exception):
    """Options that parse but do not go together: reported by argparse as a usage error (exit status 2)."""


@dataclass(frozen=True)
class Command:
    """One command: ``add_arguments(parser)`` adds its options; ``run(args, call)`` does the work and returns the
    exit status (a TrainError is reported as one line, exit status 1)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Call], int]


@dataclass(frozen=True)
class Group:
    """A command with subcommands (``sophia bench step``); ``dest`` names the chosen one among the parsed
    arguments."""

    name: str
    help: str
    dest: str
    commands: Sequence[Command | Group]


def add_commands(parser: argparse.ArgumentParser, commands: Sequence[Command | Group], dest: str) -> None:
    """``commands`` as subcommands of ``parser``; the parsed arguments' ``func`` is the chosen command's run."""
    sub = parser.add_subparsers(dest=dest, required=True)
    for command in commands:
        p = sub.add_parser(command.name, help=command.help)
        if isinstance(command, Group):
            add_commands(p, command.commands, command.dest)
        else:
            command.add_arguments(p)
            p.set_defaults(func=command.run)
