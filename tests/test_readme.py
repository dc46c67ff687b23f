"""The README's Python snippets run as written; the results it and docs/results.md quote name folders that
exist, and benchmarks/README.md indexes every results folder and script with the command that made it."""

import argparse
import json
import re
import shlex
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_DOC = ROOT / "docs" / "results.md"
BENCH_INDEX = ROOT / "benchmarks" / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
DOCS = (README, RESULTS_DOC, BENCH_INDEX)
# The sections of docs/results.md that describe procedures rather than report measurements.
NOT_RESULTS = ("Running the benchmarks",)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_readme_has_snippets():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
    if "hessian_updates" in BLOCKS[index] and "print(" in BLOCKS[index]:
        assert capsys.readouterr().out.strip(), "the snippet printed nothing"


def test_readme_keeps_a_short_verdict_and_links_the_long_results():
    text = README.read_text()
    section = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    assert "](docs/results.md)" in section and "](benchmarks/README.md)" in section
    assert len(section.strip().splitlines()) <= 30, "the long results belong in docs/results.md"
    assert RESULTS_DOC.exists() and BENCH_INDEX.exists()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_results_path_named_exists(doc):
    named = set(re.findall(r"benchmarks/results/[A-Za-z0-9._/-]*[A-Za-z0-9_]", _text(doc)))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert named and not missing, f"{doc.name} names results that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_benchmark_script_named_exists(doc):
    named = set(re.findall(r"benchmarks/[A-Za-z0-9_/-]+\.(?:py|sh)", _text(doc)))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{doc.name} names scripts that do not exist: {missing}"


def test_every_results_section_names_its_folder():
    sections = re.split(r"\n## ", RESULTS_DOC.read_text())[1:]
    assert len(sections) >= 10
    for section in sections:
        title = section.splitlines()[0]
        if title not in NOT_RESULTS:
            assert "benchmarks/results/" in section, f"docs/results.md: {title!r} names no results folder"


def test_benchmark_index_lists_every_results_folder_and_script():
    index = BENCH_INDEX.read_text()
    patterns = set(re.findall(r"`([A-Za-z0-9._-]+\*)/`", index))
    for folder in sorted(p.name for p in RESULTS.iterdir() if p.is_dir()):
        assert f"`{folder}/`" in index or any(fnmatch(folder, p) for p in patterns), \
            f"benchmarks/README.md does not index benchmarks/results/{folder}/"
    for script in sorted(ROOT.joinpath("benchmarks").rglob("*")):
        if script.suffix in (".py", ".sh") and RESULTS not in script.parents:
            name = script.relative_to(ROOT / "benchmarks").as_posix()
            assert f"`{name}`" in index, f"benchmarks/README.md does not list benchmarks/{name}"


def _recorded_commands() -> list[tuple[str, str]]:
    out = []
    for path in sorted(RESULTS.rglob("results.json")):
        if "runs" in path.relative_to(RESULTS).parts:
            continue
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "command" in data:
            out.append((path.parent.relative_to(RESULTS).as_posix(), data["command"]))
    return out


@pytest.mark.parametrize("folder,command", _recorded_commands())
def test_benchmark_index_quotes_each_recorded_command_exactly(folder, command):
    index = BENCH_INDEX.read_text()
    assert f"`{folder}/`" in index and f"`{command}`" in index, \
        f"benchmarks/README.md lacks the command recorded in benchmarks/results/{folder}/results.json"


def _index_commands() -> list[str]:
    commands = re.findall(r"`(sophia (?:bench|train) [^`]+ --[^`]+)`", _text(BENCH_INDEX))
    # Templates with placeholders (OPT, LR, ...) or optional parts are for reading, not for running as they are.
    return [c for c in commands if "..." not in c and "[" not in c and not re.search(r"\b[A-Z]{2,}\b", c)]


@pytest.mark.parametrize("command", _index_commands())
def test_benchmark_index_commands_parse_with_the_current_cli(command):
    from sophia.cli import COMMANDS
    from sophia.cli.command import add_commands

    parser = argparse.ArgumentParser(prog="sophia")
    add_commands(parser, COMMANDS, dest="command")
    try:
        parser.parse_args(shlex.split(command)[1:])
    except SystemExit:
        pytest.fail(f"benchmarks/README.md: the CLI no longer takes {command!r} (an option renamed or removed?)")
