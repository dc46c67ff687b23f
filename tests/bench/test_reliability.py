"""`sophia bench toy | step | overhead` through the real CLI: an earlier run's results are never
replaced unless asked, and a bad --device or --out-dir is one line, with nothing created."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMMANDS = {
    "toy": ["bench", "toy", "--quick"],
    "step": ["bench", "step", "--quick", "--no-compiled"],
    "overhead": ["bench", "overhead", "--quick"],
}


def _sophia(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sophia", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def _tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _earlier_run(folder: Path, files=("report.md", "results.json")) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).write_text(f"published result: {name}\n")
    (folder / "notes.txt").write_text("someone's notes\n")
    return _tree(folder)


# Each case is a subprocess (torch's import dominates): one file combination per command.
EARLIER = [("toy", ("report.md", "results.json")), ("step", ("results.json",)), ("overhead", ("report.md",)),
           ("toy", ("toy_losses.png",))]


@pytest.mark.parametrize("command,files", EARLIER, ids=[f"{c}-{f[0]}" for c, f in EARLIER])
def test_folder_with_earlier_results_is_refused_and_left_untouched(tmp_path, command, files):
    out = tmp_path / "published"
    before = _earlier_run(out, files)
    line = _one_line_error(_sophia(*COMMANDS[command], "--out-dir", str(out)))
    assert str(out) in line and "--overwrite" in line and files[0] in line
    assert _tree(out) == before  # nothing written, nothing created (no plots, no runs/)


def test_toy_uses_a_folder_without_results_and_overwrite_replaces_them(tmp_path):
    out = tmp_path / "toy"
    out.mkdir()
    (out / "notes.txt").write_text("someone's notes\n")  # not a result: does not block the run
    assert _sophia(*COMMANDS["toy"], "--out-dir", str(out)).returncode == 0
    (out / "report.md").write_text("published result\n")
    proc = _sophia(*COMMANDS["toy"], "--out-dir", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.md").read_text().startswith("# Toy problems")
    assert json.loads((out / "results.json").read_text())["command"].endswith("--overwrite")
    assert (out / "notes.txt").read_text() == "someone's notes\n"


def test_step_overwrite_replaces_the_results(tmp_path):
    out = tmp_path / "step"
    _earlier_run(out)
    proc = _sophia(*COMMANDS["step"], "--out-dir", str(out), "--overwrite", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "results.json").read_text())["preset"] == "quick"


@pytest.mark.parametrize("command", ["toy", "overhead"])
def test_out_dir_under_a_file_is_one_line_and_creates_nothing(tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = _one_line_error(_sophia(*COMMANDS[command], "--out-dir", str(blocker / "results")))
    assert "is a file" in line and str(blocker) in line
    assert blocker.read_text() == "x"


DEVICES = [("step", "foo", "--device must be"), ("overhead", "foo", "--device must be"),
           ("step", "cuda:x", "--device must be")]
if not torch.cuda.is_available():
    DEVICES += [("step", "cuda", "CUDA is not available"), ("overhead", "cuda", "CUDA is not available")]


@pytest.mark.parametrize("command,device,message", DEVICES, ids=[f"{c}-{d}" for c, d, _ in DEVICES])
def test_unusable_device_is_one_line_and_leaves_no_folder(tmp_path, command, device, message):
    out = tmp_path / "new" / "out"
    line = _one_line_error(_sophia(*COMMANDS[command], "--device", device, "--out-dir", str(out)))
    assert message in line and device in line
    assert not (tmp_path / "new").exists()


def test_step_with_one_round_is_refused_before_it_runs(tmp_path):
    # one round has no interquartile range: refused at once, not after the whole benchmark
    proc = _sophia("bench", "step", "--rounds", "1", "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and "--rounds must be >= 2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
