"""The command line: demo and the step benchmark's quick mode."""

from __future__ import annotations

import json

import pytest
import torch

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
    run = tmp_path / "demo" / "sophiag"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(args) == 0  # a second demo reuses the finished runs, overwriting nothing
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


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
    # optimizer state, float32: two tensors per parameter for Sophia and AdamW, one for Lion
    assert rows["SophiaG foreach"]["state_bytes_per_param"] == 8.0
    assert rows["AdamW fused"]["state_bytes_per_param"] == 8.0
    assert rows["Lion (pytorch-optimizer)"]["state_bytes_per_param"] == 4.0
    assert rows["SophiaH (pytorch-optimizer)"]["state_bytes_per_param"] == 12.0
    # Muon keeps one fp32 buffer on the block matrices, the AdamW part two on the embeddings and vectors
    from sophia.bench.step import PRESETS, gpt_like_shapes

    shapes = gpt_like_shapes(**PRESETS["quick"])
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    in_muon = sum(n for s, n in zip(shapes[2:], sizes[2:]) if len(s) == 2)
    assert rows["Muon + AdamW (torch, as in sophia train)"]["state_bytes_per_param"] == pytest.approx(
        (4 * in_muon + 8 * (sum(sizes) - in_muon)) / sum(sizes))
    assert result["machine"]["torch"] and result["stream_bandwidth_GBps"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "Command:" in report and "| SophiaG for-loop |" in report


def test_bench_overhead_quick_writes_report_and_results(tmp_path, capsys):
    assert main(["bench", "overhead", "--quick", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    (tiny,) = result["presets"]
    rows = {r["config"]: r for r in tiny["rows"]}
    assert rows["adamw"]["ratio_to_adamw"] == 1.0 and rows["adamw"]["extra_passes_per_step"] == 0
    assert rows["sophiag k=10"]["extra_passes_per_step"] == pytest.approx(0.1)  # 2 refreshes in 20 steps
    assert rows["sophiag k=10, 1/4 batch"]["extra_passes_per_step"] == pytest.approx(0.025)
    assert rows["sophiah k=10"]["median_refresh_ms"] > 0
    assert "| sophiag k=10 |" in (tmp_path / "report.md").read_text()


def test_bench_overhead_rejects_steps_not_a_multiple_of_k(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "overhead", "--steps", "15", "--out-dir", str(tmp_path)])


def test_each_command_reports_its_own_errors(tmp_path, capsys):
    from sophia.cli import COMMANDS, EXTRAS

    assert [c.name for c in COMMANDS] == ["train", "sample", "data", "compare", "demo", "bench"] and set(EXTRAS) == {
        c.name for c in COMMANDS}
    # options that parse but do not go together: argparse's usage error, from the top-level parser, exit status 2
    with pytest.raises(SystemExit) as e:
        main(["bench", "step", "--rounds", "1", "--out-dir", str(tmp_path / "step")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: sophia [-h]") and "sophia: error: --rounds must be >= 2" in err
    # a bad input the command finds: one line, exit status 1
    assert main(["train", "--json"]) == 1
    assert capsys.readouterr().err == "error: --json goes with --dry-run\n"
    assert main(["bench", "converge", "--lrs", "adamw", "--out-dir", str(tmp_path / "cv")]) == 1
    assert capsys.readouterr().err == "error: --lrs takes OPT=LR,LR,..., got 'adamw'\n"
    assert not (tmp_path / "step").exists() and not (tmp_path / "cv").exists()
