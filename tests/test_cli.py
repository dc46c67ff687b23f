"""The command line: demo and the step benchmark's quick mode."""

from __future__ import annotations

import json

import pytest

from sophia.cli import main


def test_demo_trains_both_optimizers_and_plots(tmp_path, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 400)
    args = ["demo", "--max-steps", "4", "--out-dir", str(tmp_path / "demo"), "--corpus", str(corpus),
            "--data-root", str(tmp_path / "data"), "--eval-batches", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "sophiag" in out and "adamw" in out
    png = tmp_path / "demo" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (tmp_path / "demo" / "sophiag" / "checkpoint.pt").read_bytes()
    assert main(args) == 0  # a second demo reuses the finished runs, overwriting nothing
    assert (tmp_path / "demo" / "sophiag" / "checkpoint.pt").read_bytes() == before


def test_demo_rejects_bad_steps(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--max-steps", "0"])
    assert e.value.code == 2
    assert "--max-steps" in capsys.readouterr().err


def test_bench_step_quick_writes_report_and_results(tmp_path, capsys):
    assert main(["bench", "step", "--quick", "--no-compiled", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["AdamW fused"]["ratio_to_adamw_fused"] == 1.0
    assert {"SophiaG for-loop", "SophiaG foreach", "AdamW foreach"} <= set(rows)
    assert all(r["median_ms"] > 0 and r["floor_ms"] > 0 for r in rows.values())
    assert result["machine"]["torch"] and result["stream_bandwidth_GBps"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "Command:" in report and "| SophiaG for-loop |" in report
