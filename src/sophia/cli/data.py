"""``sophia data prepare``: download (if needed), tokenize and store a corpus."""

from __future__ import annotations

import argparse

from sophia.cli.command import Call, Command, Group
from sophia.lm.config import TrainError


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="shakespeare, openwebtext, or a path to a text file or folder")
    p.add_argument("--tokenizer", default=None,
                   help="byte, gpt2 or bpe:N (default byte; a prepared dataset folder keeps its own)")
    p.add_argument("--data-root", default="data")


def run_prepare(args: argparse.Namespace, call: Call) -> int:
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


PREPARE = Command("prepare", "download (if needed), tokenize and store a corpus", add_prepare_arguments, run_prepare)
GROUP = Group("data", "datasets", "data_command", (PREPARE,))
