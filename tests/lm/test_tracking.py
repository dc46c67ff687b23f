"""`sophia train --log-to tensorboard,wandb`, through the real CLI and the real packages (W&B offline): what they
hold equals metrics.jsonl, a resume continues the same W&B run and leaves TensorBoard without a step twice, a failing
sink is reported once and the run goes on; the live line; bench converge passes the choice to its runs."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from sophia.cli import main
from sophia.lm.checkpoint import list_checkpoints
from sophia.lm.config import resolve_config, resume_config
from sophia.lm.metrics import Progress, read_metrics
from sophia.lm.train import Trainer

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
         "--eval-batches", "3", "--warmup-steps", "3", "--log-every", "1", "--no-progress"]
# metrics.jsonl's fields and the series they are expected under (the authors' names where they have one), spelled
# out here rather than read from sophia.lm.sinks
EXPECTED = {"train_loss": "train/loss", "val_loss": "val/loss", "lr": "lr", "win_rate": "train/win_rate",
            "hessian_norm": "hessian_norm2", "grad_norm": "train/grad_norm", "skipped_steps": "train/skipped_steps",
            "tokens_per_s": "perf/tokens_per_s", "mfu": "mfu", "elapsed": "perf/training_seconds", "tokens": "tokens",
            "train_passes": "passes/train", "hessian_passes": "passes/hessian", "hessian_updates": "hessian/refreshes",
            "hessian_skipped": "hessian/skipped_refreshes"}


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
            "WANDB_CONFIG_DIR": str(tmp / "wandb-config"), "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
            "WANDB_DATA_DIR": str(tmp / "wandb-data")}


def _args(corpus: Path, tmp: Path, out: str, *extra: str) -> list[str]:
    return ["train", "--optimizer", "sophiag", "--out-dir", str(tmp / out), "--corpus", str(corpus),
            "--data-root", str(tmp / "data"), *SMALL, *extra]


def _sophia(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sophia", *args], env=_env(tmp), capture_output=True, text=True,
                          timeout=300)


def _expected_series(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Per series, (step, value) from metrics.jsonl's train and eval events: a step once (the first event of a
    step gives it: the train event before the evaluation's)."""
    out: dict[str, dict[int, float]] = {}
    for e in read_metrics(run):
        if e["event"] not in ("train", "eval"):
            continue
        for key, value in e.items():
            if key in EXPECTED:
                out.setdefault(EXPECTED[key], {}).setdefault(e["step"], value)
            elif key in ("attn_max_logit", "attn_entropy"):
                name = {"attn_max_logit": "attention/max_logit", "attn_entropy": "attention/entropy"}[key]
                for layer, v in enumerate(value):
                    out.setdefault(f"{name}/layer_{layer}", {}).setdefault(e["step"], v)
    return {tag: sorted(points.items()) for tag, points in out.items()}


def _tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars as TensorBoard's own reader gives them (with its purge of what a resume replaced)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_equal_series(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]]):
    assert set(got) == set(want), set(got) ^ set(want)
    for tag, points in want.items():
        steps = [s for s, _ in got[tag]]
        assert steps == sorted(set(steps)), (tag, steps)  # no step twice, none out of order
        assert steps == [s for s, _ in points], tag
        for (_, a), (_, b) in zip(got[tag], points):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-12), tag  # TensorBoard keeps float32


def _wandb_records(path: Path):
    """The records of a W&B run file (its LevelDB-style log: a 7-byte header, 32 KiB blocks of records with a
    7-byte header each: crc32, length, type 1 full / 2 first / 3 middle / 4 last), as W&B's protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (n == 0 and kind == 0):  # the padded end of a block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_runs(run: Path) -> list[dict]:
    """Each offline W&B run in DIR/wandb (oldest first): its id, project, name, group, config and history."""
    runs = []
    for folder in sorted((run / "wandb").glob("offline-run-*")):
        (path,) = folder.glob("run-*.wandb")
        info: dict = {"history": {}}
        for r in _wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                info.update(id=r.run.run_id, project=r.run.project, name=r.run.display_name, group=r.run.run_group,
                            config={i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                info["history"].setdefault(row["_step"], {}).update(row)
        runs.append(info)
    return runs


def _assert_wandb_matches(history: dict[int, dict], want: dict[str, list[tuple[int, float]]], first: int = 0):
    for tag, points in want.items():
        logged = [(step, row[tag]) for step, row in sorted(history.items()) if tag in row]
        points = [p for p in points if p[0] >= first]
        assert [s for s, _ in logged] == [s for s, _ in points], tag
        assert [v for _, v in logged] == pytest.approx([v for _, v in points], rel=1e-12), tag


def test_tensorboard_and_wandb_hold_what_metrics_jsonl_holds_and_a_resume_continues_them(corpus, tmp_path):
    run = tmp_path / "run"
    proc = _sophia(tmp_path, *_args(corpus, tmp_path, "run", "--max-steps", "20", "--eval-every", "5",
                                    "--checkpoint-every", "5", "--keep-checkpoints", "5",
                                    "--log-to", "tensorboard,wandb", "--wandb-project", "tracking-test"))
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    want = _expected_series(run)
    assert {"train/win_rate", "hessian_norm2", "attention/max_logit/layer_0", "val/loss"} <= set(want)
    assert len(want["train/loss"]) == 20 and [s for s, _ in want["val/loss"]] == [0, 5, 10, 15, 20]
    _assert_equal_series(_tensorboard(run), want)

    run_id = (run / "wandb-run-id").read_text().strip()
    (first,) = _wandb_runs(run)
    assert first["id"] == run_id and first["project"] == "tracking-test" and first["name"] == "run"
    assert first["config"]["optimizer"] == "sophiag" and first["config"]["max_steps"] == 20  # the resolved config
    _assert_wandb_matches(first["history"], want)

    # A kill after step 10's checkpoint left steps 11-20 logged: the resume redoes them, and TensorBoard shows them
    # once (the resumed run's), W&B continues the same run.
    for ckpt in list_checkpoints(run):
        if int(ckpt.stem.split("-")[-1]) > 10:
            ckpt.unlink()
    proc = _sophia(tmp_path, "train", "--out-dir", str(run), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resumed" in proc.stderr and "at step 10" in proc.stderr
    want = _expected_series(run)
    assert len(want["train/loss"]) == 20
    _assert_equal_series(_tensorboard(run), want)
    assert (run / "wandb-run-id").read_text().strip() == run_id
    first, second = _wandb_runs(run)
    assert second["id"] == run_id and second["project"] == "tracking-test"
    assert min(second["history"]) == 11  # from the step after the checkpoint it resumed
    _assert_wandb_matches(second["history"], want, first=11)


def test_sigterm_then_resume_continues_the_same_wandb_run_and_tensorboard_has_each_step_once(corpus, tmp_path):
    run = tmp_path / "term"
    args = _args(corpus, tmp_path, "term", "--max-steps", "400", "--eval-every", "4", "--checkpoint-every", "1000",
                 "--log-to", "tensorboard,wandb")
    proc = subprocess.Popen([sys.executable, "-m", "sophia", *args], env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count('"train"') >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = max(e["step"] for e in read_metrics(run))
    assert 5 <= step < 400
    resumed = _sophia(tmp_path, "train", "--out-dir", str(run), "--resume", "--max-steps", str(step + 3))
    assert resumed.returncode == 0, resumed.stderr
    want = _expected_series(run)
    assert [s for s, _ in want["train/loss"]] == list(range(1, step + 4))
    _assert_equal_series(_tensorboard(run), want)
    run_id = (run / "wandb-run-id").read_text().strip()
    first, second = _wandb_runs(run)
    assert first["id"] == second["id"] == run_id
    _assert_wandb_matches(first["history"], {k: [p for p in v if p[0] <= step] for k, v in want.items()})
    _assert_wandb_matches(second["history"], want, first=step + 1)


class _Broken:
    def __init__(self, fail_in: str) -> None:
        self.fail_in, self.writes = fail_in, 0

    def write(self, event):
        self.writes += 1
        if self.fail_in == "write" and event["step"] >= 3:
            raise OSError(28, "No space left on device")

    def close(self):
        if self.fail_in == "close":
            raise ConnectionError("the server went away")


def test_a_failing_sink_is_reported_once_and_the_run_finishes(corpus, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").write_text("in the way")  # TensorBoard cannot open its folder
    cfg = resolve_config("tiny", "adamw", {"corpus": str(corpus), "data_root": str(tmp_path / "data"),
                                           "max_steps": 20, "eval_every": 10, "log_every": 1, "progress": False,
                                           "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16,
                                           "batch_size": 4, "eval_batches": 2, "log_to": "tensorboard"})
    cfg.out_dir = str(tmp_path / "run")
    broken = {"write": _Broken("write"), "close": _Broken("close")}

    class WithBrokenSinks(Trainer):
        def setup(self):
            super().setup()
            for name, sink in broken.items():
                self.metrics.add_sink(f"broken-{name}", lambda sink=sink: sink)

    lines: list[str] = []
    summary = WithBrokenSinks(cfg, log=lines.append).run()
    assert summary["steps"] == 20
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 3, warnings
    assert sum("--log-to tensorboard failed opening (FileExistsError" in w for w in warnings) == 1, warnings
    assert sum("broken-write failed at step 3 (OSError: [Errno 28] No space left on device)" in w
               for w in warnings) == 1
    assert sum("broken-close failed closing (ConnectionError: the server went away)" in w for w in warnings) == 1
    assert all("\n" not in w for w in warnings)
    assert broken["write"].writes == 5  # step 0's start and eval, steps 1, 2, then the failing 3: off from there
    assert broken["close"].writes == len(read_metrics(tmp_path / "run"))  # every event, the summary too
    assert len([e for e in read_metrics(tmp_path / "run") if e["event"] == "train"]) == 20


def test_log_to_is_checked_before_any_work(corpus, tmp_path, capsys):
    assert main(_args(corpus, tmp_path, "bad", "--max-steps", "2", "--log-to", "tensorboard,mlflow")) == 1
    line = capsys.readouterr().err.strip()
    assert line == "error: --log-to must be a comma list of none, tensorboard or wandb, got 'tensorboard,mlflow'"
    # a missing package, named before any work (an import W&B cannot do, as in an environment without it)
    code = ("import sys; sys.modules['wandb'] = None; from sophia.cli import main; "
            f"sys.exit(main({_args(corpus, tmp_path, 'nowandb', '--max-steps', '2', '--log-to', 'wandb')!r}))")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: --log-to wandb needs wandb, which is not installed: "
                                   "pip install 'sophia-lab[track]'")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "nowandb").exists()
    assert not (tmp_path / "data").exists()  # no data prepared


def test_a_resume_may_change_the_tracking_settings():
    saved = resolve_config("tiny", "adamw", {"log_to": "tensorboard"}).to_dict()
    cfg = resume_config(saved, {"log_to": "tensorboard,wandb", "wandb_project": "p", "run_name": "n"})
    assert (cfg.log_to, cfg.wandb_project, cfg.run_name) == ("tensorboard,wandb", "p", "n")
    assert resume_config(saved, {"log_to": "none"}).log_to == "none"
    assert resume_config(saved, {}).log_to == "tensorboard"  # kept when not given


def test_the_live_line_shows_loss_lr_and_tokens_per_second(capsys):
    progress = Progress(total=10, initial=0, enabled=True)
    progress.val = 2.75
    progress.show(3.14159, 6e-4, 12345.6)
    progress.update()
    progress.close()
    err = capsys.readouterr().err
    assert "loss 3.142" in err and "lr 6.00e-04" in err and "val 2.750" in err and "12,346 tok/s" in err


def test_bench_converge_passes_log_to_to_its_runs_grouped_by_sweep(tmp_path):
    from sophia.bench.converge import Setting, Sweep, build_spec

    spec = build_spec("tiny", ["adamw"], 10, 1, None, [0.05], 5, 1, "data", 1, True)
    tracking = {"log_to": "tensorboard,wandb", "run_group": "sweep1", "wandb_project": "p"}
    sweep = Sweep(tmp_path / "sweep1", spec, 1, tracking=tracking)
    for resume in (False, True):
        cmd = sweep.command(Setting("adamw", 4e-3, None, 1), resume=resume)
        for flag, value in (("--log-to", "tensorboard,wandb"), ("--run-group", "sweep1"), ("--wandb-project", "p")):
            assert cmd[cmd.index(flag) + 1] == value
    assert "--log-to" not in Sweep(tmp_path, spec, 1).command(Setting("adamw", 4e-3, None, 1), resume=False)
    # refused before anything is written
    proc = subprocess.run([sys.executable, "-m", "sophia", "bench", "converge", "--quick", "--out-dir",
                           str(tmp_path / "cv"), "--log-to", "tensorbored"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "tensorbored" in proc.stderr and not (tmp_path / "cv").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_serves_the_runs_scalars(corpus, tmp_path):
    run = tmp_path / "served"
    proc = _sophia(tmp_path, *_args(corpus, tmp_path, "served", "--max-steps", "10", "--eval-every", "5",
                                    "--log-to", "tensorboard"))
    assert proc.returncode == 0, proc.stderr
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run / "tensorboard"),
                               "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        query = urllib.parse.urlencode({"run": ".", "tag": "val/loss"})
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}"
        deadline, points = time.time() + 90, None
        while time.time() < deadline and points is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    points = json.loads(response.read())
            except OSError:  # not up yet, or the run not loaded yet
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.5)
        assert points is not None, "tensorboard did not serve the scalars in 90 s"
    finally:
        server.terminate()
        server.wait(timeout=30)
    want = [(e["step"], e["val_loss"]) for e in read_metrics(run) if e["event"] == "eval"]
    assert [step for _, step, _ in points] == [step for step, _ in want] == [0, 5, 10]
    assert [value for _, _, value in points] == pytest.approx([value for _, value in want], rel=1e-6)
    assert all(math.isfinite(value) for _, _, value in points)
