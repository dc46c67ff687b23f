"""The training loop end to end: metrics, checkpoints, refusal to overwrite, exact resume after
SIGKILL, DDP over gloo, sampling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sophia.cli import main
from sophia.lm.checkpoint import list_checkpoints
from sophia.lm.metrics import read_metrics

SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
         "--eval-batches", "2", "--warmup-steps", "3", "--log-every", "1", "--no-progress"]




def _latest(run: Path) -> Path:
    return list_checkpoints(run)[0]


def _args(corpus: Path, tmp: Path, out: str, optimizer: str, steps: int, *extra: str) -> list[str]:
    return ["train", "--optimizer", optimizer, "--max-steps", str(steps), "--out-dir", str(tmp / out),
            "--corpus", str(corpus), "--data-root", str(tmp / "data"), *SMALL, *extra]


@pytest.mark.parametrize("optimizer", ["sophiag", "sophiah", "adamw", "lion", "adahessian", "sgd"])
def test_train_writes_metrics_and_checkpoint(corpus, tmp_path, optimizer, capsys):
    assert main(_args(corpus, tmp_path, "run", optimizer, 12, "--eval-every", "6", "--hessian-interval", "4")) == 0
    events = read_metrics(tmp_path / "run")
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in train] == list(range(1, 13))
    assert [e["step"] for e in evals] == [0, 6, 12]
    for e in train:
        assert {"train_loss", "lr", "tokens", "elapsed"} <= set(e)
    assert train[-1]["tokens"] == 12 * 4 * 16
    ckpt = torch.load(_latest(tmp_path / "run"), weights_only=True)
    assert ckpt["step"] == 12 and "model" in ckpt and "optimizer" in ckpt
    if optimizer == "sophiag":  # refreshes after steps 4, 8, 12: one extra pass each
        assert train[-1]["hessian_passes"] == 3 and train[-1]["hessian_updates"] == 3
        assert 0.0 <= train[-1]["win_rate"] <= 1.0
    if optimizer == "sophiah":  # refreshes before steps 5 and 9
        assert train[-1]["hessian_updates"] == 2
    assert "val loss" in capsys.readouterr().out


def test_existing_checkpoint_is_refused_and_left_untouched(corpus, tmp_path, capsys):
    assert main(_args(corpus, tmp_path, "run", "adamw", 3)) == 0
    before = _latest(tmp_path / "run").read_bytes()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main(_args(corpus, tmp_path, "run", "adamw", 3)) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert _latest(tmp_path / "run").read_bytes() == before
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_corrupt_checkpoint_and_bad_input_are_one_clear_error(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(_args(corpus, tmp_path, "run", "adamw", 3, "--resume")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "corrupt" in err and err.count("\n") == 1, err
    assert (run / "checkpoint.pt").read_bytes() == b"not a checkpoint"
    assert main(_args(corpus, tmp_path, "other", "adamw", 3, "--lr", "-1")) == 1
    assert "--lr" in capsys.readouterr().err
    assert main(["train", "--preset", "nope"]) == 1
    assert "unknown preset" in capsys.readouterr().err
    assert main(_args(tmp_path / "missing.txt", tmp_path, "x", "adamw", 3)) == 1
    assert "error:" in capsys.readouterr().err


def test_preset_too_big_for_the_device_is_refused(corpus, tmp_path, capsys):
    args = _args(corpus, tmp_path, "big", "adamw", 1)
    args[args.index("--n-embd") + 1] = "16384"
    args[args.index("--n-layer") + 1] = "48"
    args[args.index("--n-head") + 1] = "16"
    assert main(args) == 1
    assert "GiB" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sophia", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


@pytest.mark.parametrize("optimizer", ["sophiag", "sophiah"])
def test_sigkill_then_resume_ends_bitwise_equal(corpus, tmp_path, optimizer):
    steps = 40
    common = ("--checkpoint-every", "3", "--eval-every", "10", "--hessian-interval", "4", "--dropout", "0.1")
    ref = _run_cli(_args(corpus, tmp_path, "ref", optimizer, steps, *common))
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()
    killed = _run_cli(_args(corpus, tmp_path, "killed", optimizer, steps, *common))
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 200
    while time.time() < deadline:  # kill it somewhere past a few checkpoints, mid-run
        if metrics.exists() and sum(1 for line in metrics.read_text().splitlines() if '"train"' in line) >= 17:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    resumed = _run_cli(_args(corpus, tmp_path, "killed", optimizer, steps, *common, "--resume"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    a = torch.load(_latest(tmp_path / "ref"), weights_only=True)
    b = torch.load(_latest(tmp_path / "killed"), weights_only=True)
    assert a["step"] == b["step"] == steps
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ev_a = [(e["event"], e["step"], e.get("train_loss"), e.get("val_loss")) for e in read_metrics(tmp_path / "ref")]
    ev_b = [(e["event"], e["step"], e.get("train_loss"), e.get("val_loss")) for e in read_metrics(tmp_path / "killed")
            if e["event"] != "resume"]  # the resumed run says where it resumed; everything else is the same
    assert ev_a == ev_b


def test_ddp_two_ranks_over_gloo(corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = _args(corpus, tmp_path, "ddp", "sophiag", 8, "--eval-every", "4", "--hessian-interval", "4")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "sophia", *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_metrics(tmp_path / "ddp")
    ranks = [e for e in events if e["event"] == "ranks"]
    assert ranks and ranks[0]["ranks_identical"] is True and ranks[0]["world_size"] == 2
    train = [e for e in events if e["event"] == "train"]
    assert train[-1]["tokens"] == 8 * 2 * 4 * 16  # the global batch counts both ranks
    assert train[-1]["hessian_updates"] == 2
    assert proc.stdout.count("run ") == 1  # one summary, from rank 0


def test_sample_prints_text(corpus, tmp_path, capsys):
    assert main(_args(corpus, tmp_path, "run", "adamw", 5)) == 0
    capsys.readouterr()
    assert main(["sample", "--out-dir", str(tmp_path / "run"), "--max-new-tokens", "20", "--start", "the"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the") and len(out) > 20
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["event"] == "start"


def test_resume_keeps_the_saved_settings_and_refuses_changes(corpus, tmp_path, capsys):
    assert main(_args(corpus, tmp_path, "run", "adamw", 4, "--lr", "3e-3", "--min-lr", "3e-4")) == 0
    assert main(["train", "--out-dir", str(tmp_path / "run"), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    events = read_metrics(tmp_path / "run")
    assert max(e["step"] for e in events) == 6
    ckpt = torch.load(_latest(tmp_path / "run"), weights_only=True)
    assert ckpt["config"]["lr"] == 3e-3 and ckpt["config"]["optimizer"] == "adamw"
    capsys.readouterr()
    assert main(["train", "--out-dir", str(tmp_path / "run"), "--resume", "--n-embd", "32"]) == 1
    assert "--n-embd was 16" in capsys.readouterr().err


def test_a_run_killed_before_its_first_periodic_checkpoint_can_resume(corpus, tmp_path):
    assert main(_args(corpus, tmp_path, "run", "adamw", 1, "--checkpoint-every", "100")) == 0
    ckpt = torch.load(_latest(tmp_path / "run"), weights_only=True)
    assert ckpt["step"] == 1  # the step-0 checkpoint was replaced by the final one
    assert main(["train", "--out-dir", str(tmp_path / "run"), "--resume", "--max-steps", "2", "--no-progress"]) == 0


def test_adahessian_survives_exactly_zero_hessian_estimates_under_bf16(tmp_path):
    # bf16 autocast rounds some Hutchinson estimates to exactly 0; with pytorch-optimizer's default eps (1e-16)
    # those coordinates stepped by m / 1e-16 and the run diverged at step 2. The preset uses the AdaHessian
    # authors' eps = 1e-4.
    fox = tmp_path / "fox.txt"
    fox.write_text("the quick brown fox jumps over the lazy dog. " * 2000)
    args = ["train", "--optimizer", "adahessian", "--max-steps", "12", "--out-dir", str(tmp_path / "run"),
            "--corpus", str(fox), "--data-root", str(tmp_path / "data"), "--n-layer", "2", "--n-embd", "64",
            "--n-head", "2", "--block-size", "64", "--batch-size", "16", "--warmup-steps", "5", "--eval-every", "12",
            "--eval-batches", "2", "--hessian-interval", "5", "--dtype", "bfloat16", "--no-progress"]
    assert main(args) == 0
    evals = [e for e in read_metrics(tmp_path / "run") if e["event"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
