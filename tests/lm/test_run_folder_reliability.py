"""What a run folder holds stays whole and is never mistaken for something else, through the real CLI: damaged
checkpoints never count toward --keep-checkpoints (moved aside, not deleted), a full disk during a checkpoint is
one line, a damaged metrics.jsonl does not break --resume, a reused folder samples with its own run's tokenizer,
and `sophia sample` says what it skipped or could not use."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sophia.lm.checkpoint import list_checkpoints, load_checkpoint, torch_save
from sophia.lm.metrics import read_metrics
from sophia.lm.model import GPT, GPTConfig
from sophia.lm.tokenizers import load_tokenizer

SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
         "--eval-batches", "2", "--warmup-steps", "2", "--no-progress"]
SEPARATOR = "-" * 40


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "sophia", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def _corpus(tmp: Path) -> Path:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "and", "of", "the"]
    path = tmp / "plays.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(800)))
    return path


def _train(tmp: Path, run: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    proc = _cli(["train", "--optimizer", "adamw", "--corpus", _corpus(tmp), "--data-root", tmp / "data",
                 "--out-dir", run, "--max-steps", steps, *SMALL, *extra])
    assert proc.returncode == 0, proc.stderr
    return proc


def _names(run: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run)]


def _snapshot(path: Path) -> dict[str, bytes]:
    """A file's bytes, or every file of a folder by its relative name."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


# -- 1. damaged checkpoints and --keep-checkpoints ---------------------------------------------------------------
@pytest.mark.parametrize("parallel,damage", [("ddp", "torn"), ("fsdp", "no-meta"), ("fsdp", "cut-shard")])
def test_a_damaged_checkpoint_never_counts_toward_keep_checkpoints(tmp_path, parallel, damage):
    """Checkpoints 15 and 20 (20 damaged), resumed to 17: 17 and 15 are kept, 20 is moved aside whole (never
    deleted, never read, never overwritten when step 20 is saved again)."""
    run = tmp_path / "run"
    _train(tmp_path, run, 20, "--checkpoint-every", "5", "--parallel", parallel)
    ext = "dcp" if parallel == "fsdp" else "pt"
    assert _names(run) == [f"checkpoint-{s:08d}.{ext}" for s in (20, 15)]
    damaged = run / f"checkpoint-00000020.{ext}"
    if damage == "torn":
        damaged.write_bytes(damaged.read_bytes()[:5000])
    elif damage == "no-meta":  # a folder copied by hand, say, without the file the trainer adds last
        (damaged / "meta.pt").unlink()
    else:  # a shard file cut short: .metadata and meta.pt read, the tensors do not
        shard = next(damaged.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = _snapshot(damaged)

    proc = _cli(["train", "--out-dir", run, "--resume", "--max-steps", "17", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    said = [line for line in proc.stderr.splitlines() if damaged.name in line]
    assert len(said) == 1 and said[0].startswith("warning:") and f"{damaged.name}.damaged" in said[0], proc.stderr
    assert _names(run) == [f"checkpoint-{s:08d}.{ext}" for s in (17, 15)]
    aside = run / f"{damaged.name}.damaged"
    assert _snapshot(aside) == before
    resume = [e for e in read_metrics(run) if e["event"] == "resume"][-1]
    assert resume["from_checkpoint"] == f"checkpoint-00000015.{ext}"

    if parallel == "fsdp":
        return  # the rest does not depend on the format
    # on past the damaged step: step 20 is saved anew beside the one set aside, which stays as it was
    proc = _cli(["train", "--out-dir", run, "--resume", "--max-steps", "21", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert _names(run) == [f"checkpoint-{s:08d}.{ext}" for s in (21, 20)]
    assert load_checkpoint(run)["step"] == 21 and not _warnings(proc.stderr)
    assert _snapshot(aside) == before


# -- 2. a full disk during a checkpoint --------------------------------------------------------------------------
def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_failed_checkpoint_write_is_one_line_naming_the_cause(tmp_path, parallel):
    """A write that fails (here EFBIG: a file-size limit below a checkpoint's size; a full disk is ENOSPC, the
    same path) is one error line naming the file and the cause; the earlier checkpoints stay as they were."""
    run = tmp_path / "run"
    _train(tmp_path, run, 5, "--checkpoint-every", "5", "--parallel", parallel)
    ext = "dcp" if parallel == "fsdp" else "pt"
    assert _names(run) == [f"checkpoint-{s:08d}.{ext}" for s in (5, 0)]
    before = {p.name: _snapshot(p) for p in list_checkpoints(run)}
    biggest = max(len(b) for snap in before.values() for b in snap.values())
    assert biggest > 64 * 1024  # so the limit below stops the checkpoint, and nothing else of the run

    proc = _cli(["train", "--out-dir", run, "--resume", "--max-steps", "10", "--no-progress"],
                preexec_fn=_file_size_limit(64 * 1024))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "inline_container" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr
    assert f"checkpoint-00000010.{ext}" in errors[0] and "File too large (EFBIG)" in errors[0], errors[0]
    assert f"kept (newest: checkpoint-00000005.{ext})" in errors[0] and "--resume" in errors[0], errors[0]
    assert {p.name: _snapshot(p) for p in list_checkpoints(run)} == before
    assert not list(run.glob(".checkpoint*"))  # nothing half-written left behind
    if parallel == "fsdp":
        return
    proc = _cli(["train", "--out-dir", run, "--resume", "--max-steps", "10", "--no-progress"])  # space again
    assert proc.returncode == 0, proc.stderr
    assert _names(run) == [f"checkpoint-{s:08d}.{ext}" for s in (10, 5)]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_torch_save_raises_the_oserror_torch_wraps():
    """torch.save into a full device, through a buffered file as save_checkpoint writes, raises
    RuntimeError('[enforce fail at inline_container.cc...] unexpected pos ...'), naming no cause; torch_save
    raises the OSError itself, so that the message can name ENOSPC."""
    state = {"w": torch.zeros(100_000)}
    for save, raised in ((torch.save, RuntimeError), (torch_save, OSError)):
        f = open("/dev/full", "wb")  # noqa: SIM115 - closed below, where its last flush fails too
        try:
            with pytest.raises(raised) as caught:
                save(state, f)
        finally:
            with contextlib.suppress(OSError):
                f.close()
        if raised is RuntimeError:
            assert "inline_container" in str(caught.value) and "space" not in str(caught.value)
        else:
            assert caught.value.errno == errno.ENOSPC


# -- 3. a damaged metrics.jsonl ----------------------------------------------------------------------------------
def test_a_damaged_metrics_log_does_not_break_resume(tmp_path):
    run = tmp_path / "run"
    _train(tmp_path, run, 6, "--checkpoint-every", "3", "--log-every", "1")
    log = run / "metrics.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    bad = [b"42\n", b'{"step": null}\n', bytes(random.Random(1).randrange(256) for _ in range(64)).replace(
        b"\n", b"") + b"\xff\n"]
    log.write_bytes(b"".join(lines[:3] + bad + lines[3:]))
    damaged = log.read_bytes()

    proc = _cli(["train", "--out-dir", run, "--resume", "--max-steps", "8", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    said = [line for line in proc.stderr.splitlines() if "metrics.jsonl" in line and "skipped" in line]
    assert len(said) == 1 and said[0].startswith("warning:") and "skipped 3 line(s)" in said[0], proc.stderr
    kept = list(run.glob("metrics.jsonl.*.damaged"))
    assert len(kept) == 1 and kept[0].name in said[0] and kept[0].read_bytes() == damaged
    events = read_metrics(run)
    assert sorted(e["step"] for e in events if e["event"] == "train") == list(range(1, 9))
    assert [e["step"] for e in events if e["event"] == "resume"] == [6]


def test_read_metrics_skips_what_holds_no_event_and_says_so_once(tmp_path):
    good = [{"step": 0, "event": "eval", "val_loss": 5.5}, {"step": 1, "event": "train", "train_loss": 5.0}]
    raw = [json.dumps(good[0]), "42", '{"step": null}', "[1, 2]", '{"step": 1, "event": "eval", "val_loss": "x"}',
           "", json.dumps(good[1])]
    (tmp_path / "metrics.jsonl").write_bytes("\n".join(raw).encode() + b"\n\x80\x81 not utf-8\n" + b'{"step": 2, "ev')
    said: list[str] = []
    assert read_metrics(tmp_path, log=said.append) == good
    # five damaged lines; the blank line and the unterminated last one (a write in progress, or cut by a kill)
    # are not damage
    assert len(said) == 1 and "skipped 5 line(s)" in said[0] and str(tmp_path / "metrics.jsonl") in said[0]


# -- 4. a reused out-dir and its tokenizer ------------------------------------------------------------------------
def _greedy_text(run: Path, prompt: str, n: int) -> str:
    """An independent greedy decode with the tokenizer of the dataset the checkpoint trained on."""
    ckpt = load_checkpoint(run, purpose="sample")
    tok = load_tokenizer(Path(ckpt["dataset_dir"]))
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    ids = tok.encode(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids[-model.config.block_size:]]))
            ids.append(int(logits[0, -1].argmax()))
    return tok.decode(ids)


@pytest.mark.parametrize("first,second", [("byte", "bpe:300"), ("bpe:300", "byte")])
def test_a_reused_out_dir_samples_with_its_own_runs_tokenizer(tmp_path, first, second):
    run = tmp_path / "run"
    _train(tmp_path, run, 2, "--tokenizer", first)
    for path in list_checkpoints(run):
        path.unlink()  # the folder is reused for another run
    proc = _train(tmp_path, run, 2, "--tokenizer", second)
    out = _cli(["sample", "--out-dir", run, "--start", "alpha", "--temperature", "0", "--max-new-tokens", "12"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{_greedy_text(run, 'alpha', 12)}\n{SEPARATOR}\n"
    assert not _warnings(out.stderr)
    assert json.loads((run / "tokenizer" / "meta.json").read_text())["tokenizer"] == second
    said = [line for line in proc.stderr.splitlines() if "tokenizer" in line and "replaced" in line]
    assert len(said) == 1 and str(run / "tokenizer") in said[0], proc.stderr  # said once, when it happened


# -- 5, 6. what `sophia sample` skips or cannot use ---------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Two finished runs (checkpoints 4 and 2), one per tokenizer kind, to be copied by each test."""
    tmp = tmp_path_factory.mktemp("trained")
    runs = {}
    for tok in ("byte", "bpe:300"):
        runs[tok] = tmp / f"run-{tok.replace(':', '')}"
        _train(tmp, runs[tok], 4, "--tokenizer", tok, "--checkpoint-every", "2")
    return runs


def test_sample_says_which_damaged_checkpoint_it_skipped(trained, tmp_path):
    run = shutil.copytree(trained["byte"], tmp_path / "run")
    newest = run / "checkpoint-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:3000])
    before = newest.read_bytes()
    proc = _cli(["sample", "--out-dir", run, "--start", "alpha", "--temperature", "0", "--max-new-tokens", "5"])
    assert proc.returncode == 0, proc.stderr
    said = _warnings(proc.stderr)
    assert len(said) == 1 and "checkpoint-00000004.pt" in said[0] and "checkpoint-00000002.pt" in said[0], said
    assert newest.read_bytes() == before  # sampling reads; it changes nothing in the run folder


@pytest.mark.parametrize("damage", ["garbled-meta", "emptied", "garbled-bpe"])
def test_a_damaged_run_tokenizer_is_named_as_such(trained, tmp_path, damage):
    tok = "bpe:300" if damage == "garbled-bpe" else "byte"
    run = shutil.copytree(trained[tok], tmp_path / "run")
    kept = run / "tokenizer"
    if damage == "garbled-meta":
        (kept / "meta.json").write_text('{"tokenizer": "by')
    elif damage == "emptied":
        for f in kept.iterdir():
            f.unlink()
    else:
        (kept / "tokenizer.json").write_text("{ not json")
    args = ["sample", "--out-dir", run, "--start", "alpha", "--temperature", "0", "--max-new-tokens", "5"]

    # the dataset is still there: its tokenizer is used, and the damaged copy is named
    proc = _cli(args)
    assert proc.returncode == 0, proc.stderr
    said = _warnings(proc.stderr)
    assert len(said) == 1 and f"{kept} is damaged" in said[0] and "dataset" in said[0], said
    assert proc.stdout == f"{_greedy_text(run, 'alpha', 5)}\n{SEPARATOR}\n"

    # without the dataset: one error line that names the run's copy, not a dataset to prepare
    dataset = Path(load_checkpoint(run)["dataset_dir"])
    hidden = dataset.with_name(dataset.name + ".away")
    dataset.rename(hidden)
    try:
        proc = _cli(args)
    finally:
        hidden.rename(dataset)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert f"the run folder's tokenizer copy {kept} is damaged" in lines[0] and "is gone" in lines[0], lines[0]
    assert f"sophia data prepare {(trained[tok].parent / 'plays.txt').resolve()} --tokenizer {tok}" in lines[0]
    assert "is not a prepared dataset" not in lines[0] and f"delete {kept}" not in lines[0]


def test_a_nanogpt_folder_without_meta_pkl_samples_from_the_run_folder(tmp_path):
    """nanoGPT's GPT-2 token folders (train.bin and val.bin only) have no file that names their tokenizer: the
    run's copy says gpt2 itself, instead of being an empty folder that sample cannot read."""
    import numpy as np

    data = tmp_path / "owt"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", 4000), ("val.bin", 1000)):
        rng.integers(0, 50257, n).astype(np.uint16).tofile(data / name)
    run = tmp_path / "run"
    proc = _cli(["train", "--optimizer", "adamw", "--corpus", data, "--out-dir", run, "--max-steps", "2", *SMALL])
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(data)  # sampling needs only the run folder
    out = _cli(["sample", "--out-dir", run, "--start", "Hello", "--temperature", "0", "--max-new-tokens", "3"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Hello") and not _warnings(out.stderr)
