"""`sophia sample` through the real CLI: settings checked with one-line errors, temperature 0 is
greedy decoding, and text is printed while it is generated."""

from __future__ import annotations

import os
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sophia.lm.checkpoint import load_checkpoint
from sophia.lm.model import GPT, GPTConfig

SEPARATOR = "-" * 40


def _sophia(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sophia", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sample")
    rng = random.Random(0)
    words = ["the", "king", "queen", "crown", "night", "love", "and", "of"]
    (tmp / "plays.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(400)))
    proc = _sophia("train", "--max-steps", "3", "--out-dir", str(tmp / "run"), "--corpus", str(tmp / "plays.txt"),
                   "--data-root", str(tmp / "data"), "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                   "--block-size", "16", "--batch-size", "4", "--eval-batches", "1", "--no-progress",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


@pytest.mark.parametrize("args,message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be between 1 and 100000"),
    (["--max-new-tokens", "100001"], "--max-new-tokens must be between 1 and 100000"),
], ids=["nan", "inf", "negative", "zero-tokens", "too-many-tokens"])
def test_bad_setting_is_one_line_error(run_dir, args, message):
    proc = _sophia("sample", "--out-dir", str(run_dir), *args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}") and args[1] in lines[0], proc.stderr


def _greedy(run_dir: Path, prompt: str, n: int) -> str:
    """An independent greedy decode: the argmax of the model's last logits, n times."""
    ckpt = load_checkpoint(run_dir, purpose="sample")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    ids = list(prompt.encode())  # the byte tokenizer of the fixture's run
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids[-model.config.block_size:]]))
            ids.append(int(logits[0, -1].argmax()))
    return bytes(ids).decode("utf-8", errors="replace")


def test_temperature_zero_is_greedy_decoding(run_dir):
    outs = [_sophia("sample", "--out-dir", str(run_dir), "--temperature", "0", "--start", "the king",
                    "--max-new-tokens", "40", "--num-samples", "2", "--seed", seed) for seed in ("1", "2")]
    assert all(o.returncode == 0 for o in outs), outs[0].stderr
    expected = _greedy(run_dir, "the king", 40)
    assert outs[0].stdout == outs[1].stdout == f"{expected}\n{SEPARATOR}\n" * 2


def test_sampled_text_is_printed_while_it_is_generated(run_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sophia", "sample", "--out-dir", str(run_dir),
                             "--max-new-tokens", "100000", "--temperature", "1.0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        got, deadline = b"", time.monotonic() + 90
        while len(got) < 30 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                got += chunk
        assert len(got) >= 30, proc.stderr.read() if proc.poll() is not None else got
        assert proc.poll() is None  # the first text came long before the 100000th token
    finally:
        proc.kill()
        proc.wait()
