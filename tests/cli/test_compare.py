"""`sophia compare` on real runs, through the CLI: the PNG, and a table whose numbers are computed again here from
the runs' metrics.jsonl; bench converge folders; folders that are not runs; --out checks."""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from sophia.cli import main

SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
         "--eval-batches", "2", "--warmup-steps", "2", "--no-progress", "--max-steps", "20", "--eval-every", "5",
         "--log-every", "2"]
PNG = b"\x89PNG\r\n\x1a\n"


def _sophia(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sophia", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two real 20-step runs: AdamW and SophiaG."""
    tmp = tmp_path_factory.mktemp("compare")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "and", "of", "the"]
    corpus = tmp / "plays.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(800)))
    out = []
    for optimizer, lr in (("adamw", "0.004"), ("sophiag", "0.001")):
        proc = _sophia("train", "--optimizer", optimizer, "--lr", lr, "--min-lr", "0.0001", "--corpus", str(corpus),
                       "--data-root", str(tmp / "data"), "--out-dir", str(tmp / optimizer), *SMALL)
        assert proc.returncode == 0, proc.stderr
        out.append(tmp / optimizer)
    return out[0], out[1]


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _crossing(evals: list[dict], target: float) -> dict | None:
    """Where the validation loss first reaches ``target``, linear between the evaluations around it."""
    for i, e in enumerate(evals):
        if e["val_loss"] <= target:
            if i == 0:
                return {"steps": e["step"], "tokens": e["tokens"], "passes": e["train_passes"] + e["hessian_passes"]}
            a = evals[i - 1]
            f = (a["val_loss"] - target) / (a["val_loss"] - e["val_loss"])
            return {"steps": a["step"] + f * (e["step"] - a["step"]),
                    "tokens": a["tokens"] + f * (e["tokens"] - a["tokens"]),
                    "passes": (a["train_passes"] + a["hessian_passes"])
                    + f * (e["train_passes"] + e["hessian_passes"] - a["train_passes"] - a["hessian_passes"])}
    return None


def _table(stdout: str) -> dict[str, dict[str, str]]:
    """The Markdown table's rows by run, each a {column: cell}."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1]) <= {"|", "-"}
    rows = [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return {row["run"]: row for row in rows}


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_compare_two_runs_writes_a_png_and_a_table_of_their_numbers(runs, tmp_path):
    out = tmp_path / "plots" / "adamw-vs-sophiag.png"
    proc = _sophia("compare", *map(str, runs), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().startswith(PNG)
    from matplotlib.image import imread

    height, width, _ = imread(out).shape
    assert width > height > 300  # the panels side by side

    table = _table(proc.stdout)
    assert set(table) == {"adamw", "sophiag"}
    finals = {}
    for run in runs:
        evals = [e for e in _events(run) if e["event"] == "eval"]
        finals[run.name] = evals[-1]["val_loss"]
    target = min(finals.values())
    assert f"Target: {target:.4f}, the final validation loss of {min(finals, key=finals.get)}" in proc.stdout
    for run in runs:
        events = _events(run)
        evals = [e for e in events if e["event"] == "eval"]
        row = table[run.name]
        start = next(e for e in events if e["event"] == "start")
        assert row["optimizer"] == run.name == start["config"]["optimizer"]
        assert float(row["lr"]) == {"adamw": 0.004, "sophiag": 0.001}[run.name]
        assert int(row["steps"]) == 20
        assert _number(row["final val loss"]) == pytest.approx(evals[-1]["val_loss"], abs=5e-5)
        assert _number(row["best val loss"]) == pytest.approx(min(e["val_loss"] for e in evals), abs=5e-5)
        reached = _crossing(evals, target)
        if reached is None:  # the other run need not reach the best run's final loss
            assert row["steps to target"] == row["tokens to target"] == row["passes to target"] == "-"
        else:
            assert _number(row["steps to target"]) == pytest.approx(reached["steps"], abs=0.05)
            assert _number(row["tokens to target"]) == pytest.approx(reached["tokens"], abs=0.5)
            assert _number(row["passes to target"]) == pytest.approx(reached["passes"], abs=0.05)
        summary = [e for e in events if e["event"] == "summary"][-1]
        assert _number(row["tokens/s"]) == pytest.approx(summary["steady_tokens_per_s"], abs=0.5)
        assert row["MFU"] == "-"  # a CPU run: no peak to measure it against
    # the best run reaches the target at its last evaluation, or before it when its final was not its best
    best = min(finals, key=finals.get)
    assert _number(table[best]["steps to target"]) <= 20


def test_every_x_axis_and_the_json_rows(runs, tmp_path, capsys):
    for x in ("tokens", "seconds", "passes"):
        out = tmp_path / f"{x}.svg" if x == "seconds" else tmp_path / f"{x}.png"
        assert main(["compare", *map(str, runs), "--out", str(out), "--x", x]) == 0
        assert out.stat().st_size > 1000
    capsys.readouterr()
    assert main(["compare", *map(str, runs), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for row, run in zip(rows, runs):
        evals = [e for e in _events(run) if e["event"] == "eval"]
        assert row["final_val_loss"] == evals[-1]["val_loss"]
        trains = [e for e in _events(run) if e["event"] == "train"]
        assert len(trains) == 10 and statistics.median(e["tokens_per_s"] for e in trains) > 0


def test_a_bench_converge_folder_gives_one_curve_per_finished_run(runs, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    (sweep / "runs").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}\n")
    shutil.copytree(runs[0], sweep / "runs" / "adamw-lr0.004-s0")
    (sweep / "runs" / "adamw-lr0.004-s0" / "result.json").write_text('{"status": "ok"}\n')
    shutil.copytree(runs[1], sweep / "runs" / "sophiag-lr0.001-rho0.05-s0")  # unfinished: no result.json
    assert main(["compare", str(sweep), str(runs[1]), "--out", str(tmp_path / "c.png")]) == 0
    assert set(_table(capsys.readouterr().out)) == {"sweep/adamw-lr0.004-s0", "sophiag"}


def test_a_folder_that_is_not_a_run_is_named_and_nothing_is_written(runs, tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("hello")
    out = tmp_path / "c.png"
    proc = _sophia("compare", str(runs[0]), str(other), str(tmp_path / "missing"), "--out", str(out))
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error:") and str(other) in line and str(tmp_path / "missing") in line
    assert "does not exist" in line and "metrics.jsonl" in line
    assert not out.exists()
    empty_sweep = tmp_path / "sweep"
    empty_sweep.mkdir()
    (empty_sweep / "sweep.json").write_text("{}\n")
    assert main(["compare", str(empty_sweep)]) == 1
    assert "without a finished run" in capsys.readouterr().err


def test_out_must_be_a_picture_file_and_an_existing_one_is_replaced(runs, tmp_path, capsys):
    folder = tmp_path / "figs"
    folder.mkdir()
    assert main(["compare", *map(str, runs), "--out", str(folder)]) == 1
    assert "is a folder" in capsys.readouterr().err
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "c.txt")]) == 1
    assert ".png" in capsys.readouterr().err and not (tmp_path / "c.txt").exists()
    out = tmp_path / "c.png"
    out.write_bytes(b"old")
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG)
