"""`sophia train` never trains on the wrong thing or loses what a user has:
resume from another directory, changed data, bad token ids, nanoGPT directories, file-system errors."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sophia.lm.checkpoint import list_checkpoints
from sophia.lm.metrics import read_metrics

SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
         "--eval-batches", "2", "--warmup-steps", "2", "--no-progress"]


def _cli(args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sophia", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _text(path: Path, seed: int) -> Path:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "and", "of", "the"]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(800)))
    return path


def test_resume_from_another_directory_reads_the_same_corpus(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _text(a / "plays.txt", 0)
    _text(b / "plays.txt", 1)  # the same relative name, another text
    run = tmp_path / "run"
    first = _cli(["train", "--optimizer", "adamw", "--corpus", "plays.txt", "--data-root", str(tmp_path / "data"),
                  "--out-dir", str(run), "--max-steps", "3", *SMALL], cwd=a)
    assert first.returncode == 0, first.stderr
    again = _cli(["train", "--out-dir", str(run), "--resume", "--max-steps", "5", "--no-progress"], cwd=b)
    assert again.returncode == 0, again.stderr
    import torch

    ckpt = torch.load(list_checkpoints(run)[0], weights_only=True)
    assert ckpt["config"]["corpus"] == str((a / "plays.txt").resolve())
    assert ckpt["dataset"]["dir"] == ckpt["dataset_dir"]
    assert len(list((tmp_path / "data").iterdir())) == 1  # no second dataset was prepared


def test_resume_refuses_a_dataset_other_than_the_checkpoints(tmp_path):
    corpus = _text(tmp_path / "plays.txt", 0)
    run = tmp_path / "run"
    assert _cli(["train", "--optimizer", "adamw", "--corpus", str(corpus), "--data-root", str(tmp_path / "d1"),
                 "--out-dir", str(run), "--max-steps", "2", *SMALL]).returncode == 0
    _text(corpus, 5)  # the file changes, and a fresh data root would prepare it anew
    proc = _cli(["train", "--out-dir", str(run), "--resume", "--max-steps", "4", "--data-root", str(tmp_path / "d2"),
                 "--no-progress"])
    assert proc.returncode == 1
    assert "not the one the checkpoint trained on" in proc.stderr and "source_sha256" in proc.stderr
    assert [e["step"] for e in read_metrics(run) if e["event"] == "eval"] == [0, 2]


def _nanogpt_dir(path: Path, vocab: int, top: int) -> Path:
    path.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", 20000), ("val.bin", 3000)):
        ids = rng.integers(0, vocab, n).astype(np.uint16)
        ids[n // 2] = top
        ids.tofile(path / name)
    with open(path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab, "itos": {i: chr(97 + i % 26) for i in range(vocab)},
                     "stoi": {chr(97 + i % 26): i for i in range(26)}}, f)
    return path


def test_a_nanogpt_data_directory_trains_from_the_cli(tmp_path):
    d = _nanogpt_dir(tmp_path / "shakespeare_char", vocab=65, top=64)
    proc = _cli(["train", "--optimizer", "adamw", "--corpus", str(d), "--out-dir", str(tmp_path / "run"),
                 "--max-steps", "3", *SMALL])
    assert proc.returncode == 0, proc.stderr
    start = [e for e in read_metrics(tmp_path / "run") if e["event"] == "start"][0]
    assert start["parameters"] > 0
    import torch

    ckpt = torch.load(list_checkpoints(tmp_path / "run")[0], weights_only=True)
    assert ckpt["model_config"]["vocab_size"] == 65


def test_token_ids_beyond_the_vocabulary_are_refused_before_training(tmp_path):
    d = _nanogpt_dir(tmp_path / "bad", vocab=65, top=300)
    proc = _cli(["train", "--optimizer", "adamw", "--corpus", str(d), "--out-dir", str(tmp_path / "run"),
                 "--max-steps", "3", *SMALL])
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "token id 300" in errors[0] and "65 ids" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list_checkpoints(tmp_path / "run")


@pytest.mark.parametrize("case", ["out-is-file", "out-under-file", "data-root-is-file", "read-only"])
def test_file_system_problems_are_one_line_before_any_work(tmp_path, case):
    corpus = _text(tmp_path / "plays.txt", 0)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out, data_root = tmp_path / "run", tmp_path / "data"
    if case == "out-is-file":
        out = blocker
    elif case == "out-under-file":
        out = blocker / "run"
    elif case == "data-root-is-file":
        data_root = blocker
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "run"
    proc = _cli(["train", "--optimizer", "adamw", "--corpus", str(corpus), "--data-root", str(data_root),
                 "--out-dir", str(out), "--max-steps", "2", *SMALL])
    assert proc.returncode == 1
    assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(blocker if case != "read-only" else tmp_path / "ro") in proc.stderr
    assert not (tmp_path / "data").exists() or case == "data-root-is-file"  # nothing prepared first


def test_sample_needs_only_the_run_folder(tmp_path):
    import shutil

    corpus = _text(tmp_path / "plays.txt", 0)
    for tok in ("byte", "bpe:300"):
        run = tmp_path / f"run-{tok.replace(':', '')}"
        data_root = tmp_path / f"data-{tok.replace(':', '')}"
        assert _cli(["train", "--optimizer", "adamw", "--corpus", str(corpus), "--tokenizer", tok, "--data-root",
                     str(data_root), "--out-dir", str(run), "--max-steps", "2", *SMALL]).returncode == 0
        assert (run / "tokenizer" / "meta.json").is_file()
        shutil.rmtree(data_root)  # the dataset is gone (or was on another machine)
        proc = _cli(["sample", "--out-dir", str(run), "--start", "alpha", "--max-new-tokens", "10"])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("alpha")
