"""``sophia train --parallel fsdp`` (FSDP2) on 2 CPU ranks over gloo, through real torchrun: the same losses as
DDP on the same seed (AdamW, Sophia-G with its refreshes, Sophia-H with its Hutchinson estimates), sharded DCP
checkpoints that resume exactly after a SIGKILL and are never picked half-written, `sophia sample` on them, a
one-process FSDP run, a NaN in one rank's gradient shard skipped by every rank, the gpt2-xl preset and the
per-device memory plan."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sophia.cli import main
from sophia.lm.checkpoint import list_checkpoints, load_checkpoint, load_sharded_model
from sophia.lm.memory import GiB, estimate, gpt_parameters
from sophia.lm.metrics import read_metrics
from sophia.lm.model import GPT, GPTConfig
from sophia.lm.presets import PRESETS

SMALL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
         "--eval-batches", "3", "--warmup-steps", "3", "--log-every", "1", "--no-progress", "--grad-accum", "4",
         "--hessian-interval", "3", "--eval-every", "10"]
STEPS = 20


def _args(corpus: Path, tmp: Path, out: str, optimizer: str, steps: int, *extra: str) -> list[str]:
    return ["train", "--optimizer", optimizer, "--max-steps", str(steps), "--out-dir", str(tmp / out),
            "--corpus", str(corpus), "--data-root", str(tmp / "data"), *SMALL, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


def _torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "sophia", *args]


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(nproc, args), env=_env(), capture_output=True, text=True, timeout=300)


def _why(proc: subprocess.CompletedProcess) -> str:
    """The ranks' own output, without torchrun's traceback (the last one) that would crowd it out."""
    err = proc.stderr
    if "ChildFailedError" in err:
        err = err[: err.rfind("Traceback (most recent call last)")]
    return "\n".join(line for line in err.splitlines() if not line.startswith(("W1", "I1")))[-4000:]


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sophia", *args], env=_env(), capture_output=True, text=True,
                          timeout=300)


def _train_events(run: Path) -> dict[int, dict]:
    return {e["step"]: e for e in read_metrics(run) if e["event"] == "train"}


def _evals(run: Path) -> list[float]:
    return [e["val_loss"] for e in read_metrics(run) if e["event"] == "eval"]


# -- FSDP2 against DDP ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer,extra", [("adamw", ()), ("sophiag", ("--activation-checkpointing",)),
                                             ("sophiah", ())])
def test_fsdp_trains_like_ddp_on_the_same_seed(corpus, tmp_path, optimizer, extra):
    """2 ranks, 2 micro-batches each (the first without a reduce), a refresh every 3 steps: per-step training
    losses, evaluations (3 batches over 2 ranks: unequal shares) and Sophia's diagnostics as under DDP."""
    ddp = _torchrun(2, _args(corpus, tmp_path, "ddp", optimizer, STEPS))
    assert ddp.returncode == 0, _why(ddp)
    fsdp = _torchrun(2, _args(corpus, tmp_path, "fsdp", optimizer, STEPS, "--parallel", "fsdp", *extra))
    assert fsdp.returncode == 0, _why(fsdp)
    assert "FSDP2 over 2 rank(s)" in fsdp.stderr
    a, b = _train_events(tmp_path / "ddp"), _train_events(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step]["train_loss"] == pytest.approx(a[step]["train_loss"], rel=1e-5, abs=1e-6), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4, abs=1e-6), step
    assert a[STEPS]["train_loss"] < a[1]["train_loss"] - 0.3  # it learned: the comparison is not of two constants
    assert _evals(tmp_path / "fsdp") == pytest.approx(_evals(tmp_path / "ddp"), rel=1e-5)
    # gathered weights on every rank, reported by rank 0. Sophia's key bias drifts by sign steps on rounding noise
    # (see below): it shifts whole rows of logits, which leaves the entropy alone but not the largest |logit|.
    stats = ("attn_max_logit", "attn_entropy") if optimizer == "adamw" else ("attn_entropy",)
    attn = {run: [sum((e[k] for k in stats), []) for e in read_metrics(tmp_path / run) if e["event"] == "eval"]
            for run in ("ddp", "fsdp")}
    assert len(attn["fsdp"]) == 3 and all(a == pytest.approx(b, rel=1e-4, abs=1e-4)
                                          for a, b in zip(attn["fsdp"], attn["ddp"]))
    if optimizer != "adamw":
        # refreshes after steps 3, 6, ..., 18 (Sophia-G) or before steps 4, 7, ... (Sophia-H), all of them counted
        assert b[STEPS]["hessian_updates"] == a[STEPS]["hessian_updates"] == 6
        assert b[STEPS]["hessian_norm"] == pytest.approx(a[STEPS]["hessian_norm"], rel=1e-4)
        assert b[STEPS]["win_rate"] == pytest.approx(a[STEPS]["win_rate"], abs=0.01)
        hp = lambda run: [e["hessian_passes"] for e in read_metrics(run) if e["event"] == "train"]  # noqa: E731
        assert hp(tmp_path / "fsdp") == hp(tmp_path / "ddp")
    ranks = [e for e in read_metrics(tmp_path / "fsdp") if e["event"] == "ranks"]
    assert ranks and ranks[0]["sharded"] is True
    # sharded checkpoints, each a DCP folder; `sophia sample` assembles one and samples as from DDP's
    ckpts = list_checkpoints(tmp_path / "fsdp")
    assert [p.name for p in ckpts] == [f"checkpoint-{STEPS:08d}.dcp", "checkpoint-00000000.dcp"]
    assert sorted(f.name for f in ckpts[0].iterdir() if f.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    ref = torch.load(list_checkpoints(tmp_path / "ddp")[0], weights_only=True)["model"]
    model = GPT(GPTConfig(**load_checkpoint(tmp_path / "fsdp")["model_config"]))
    load_sharded_model(ckpts[0], model)
    got = model.state_dict()
    for name, value in got.items():
        if optimizer != "adamw" and name.endswith("attn.qkv.bias"):
            # The key bias adds a constant to each row of attention logits: its gradient is zero but for
            # rounding noise, on which Sophia (curvature ~0: a sign step) moves by +-lr either way. The rest is tight.
            value, want = torch.cat([value[:16], value[32:]]), torch.cat([ref[name][:16], ref[name][32:]])
        else:
            want = ref[name]
        torch.testing.assert_close(value, want, rtol=1e-4, atol=1e-5)
    if optimizer == "adamw":
        sample = _cli(["sample", "--out-dir", str(tmp_path / "fsdp"), "--max-new-tokens", "20", "--seed", "3"])
        assert sample.returncode == 0, sample.stderr
        assert len(sample.stdout.split("-" * 40)[0]) > 10


# -- checkpoints ------------------------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc), deepest first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return _descendants_of(pid, children)


def _descendants_of(pid: int, children: dict[int, list[int]]) -> list[int]:
    out: list[int] = []
    for child in children.get(pid, []):
        out += [*_descendants_of(child, children), child]
    return out


def test_sigkill_then_resume_continues_exactly(corpus, tmp_path):
    steps = 40
    common = ("--parallel", "fsdp", "--checkpoint-every", "3", "--eval-every", "20", "--keep-checkpoints", "2")
    straight = _torchrun(2, _args(corpus, tmp_path, "straight", "sophiag", steps, *common))
    assert straight.returncode == 0, _why(straight)
    args = _args(corpus, tmp_path, "killed", "sophiag", steps, *common, "--resume", "auto")
    proc = subprocess.Popen(_torchrun_cmd(2, args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"train"') >= 8:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    # torchrun starts each rank in a session of its own: kill the ranks by id, wherever they are (perhaps
    # mid-save), then torchrun
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    done = _torchrun(2, args)  # the same command, as torchrun --max-restarts would repeat it
    assert done.returncode == 0, _why(done)
    events = read_metrics(tmp_path / "killed")
    resumed = [e for e in events if e["event"] == "resume"]
    assert resumed and resumed[0]["from_checkpoint"].endswith(".dcp"), done.stderr[-2000:]
    a, b = _train_events(tmp_path / "straight"), _train_events(tmp_path / "killed")
    assert sorted(b) == list(range(1, steps + 1))
    assert [b[s]["train_loss"] for s in b] == [a[s]["train_loss"] for s in b]  # bitwise: same world size
    assert b[steps]["hessian_updates"] == a[steps]["hessian_updates"] == steps // 3
    assert _evals(tmp_path / "killed")[-1] == _evals(tmp_path / "straight")[-1]
    assert not list((tmp_path / "killed").glob(".checkpoint*"))


def test_a_checkpoint_cut_short_is_never_picked(corpus, tmp_path, capsys):
    run = tmp_path / "cut"
    first = _torchrun(2, _args(corpus, tmp_path, "cut", "adamw", 10, "--parallel", "fsdp", "--checkpoint-every", "5",
                               "--keep-checkpoints", "3"))
    assert first.returncode == 0, _why(first)
    good = run / "checkpoint-00000010.dcp"
    # what a kill leaves: DCP writing shards (no .metadata yet), and a whole folder not yet renamed into place
    shutil.copytree(good, run / ".checkpoint-00000015.dcp.tmp", ignore=shutil.ignore_patterns(".metadata", "meta.pt"))
    shutil.copytree(good, run / ".checkpoint-00000020.dcp.tmp")
    # and a folder with a final name but cut (copied by hand, say): reported, skipped
    shutil.copytree(good, run / "checkpoint-00000025.dcp", ignore=shutil.ignore_patterns("meta.pt"))
    assert load_checkpoint(run)["path"].endswith("checkpoint-00000010.dcp")
    again = _torchrun(2, ["train", "--out-dir", str(run), "--resume", "--max-steps", "12", "--no-progress"])
    assert again.returncode == 0, _why(again)
    assert "checkpoint-00000025.dcp is incomplete" in again.stderr
    resume = [e for e in read_metrics(run) if e["event"] == "resume"][-1]
    assert resume["from_checkpoint"] == "checkpoint-00000010.dcp"
    assert not list(run.glob(".checkpoint*"))  # the temporary folders were cleared
    assert sorted(_train_events(run)) == list(range(1, 13))
    # a DDP resume of a sharded run is refused, naming the flag
    capsys.readouterr()
    assert main(["train", "--out-dir", str(run), "--resume", "--parallel", "ddp", "--no-progress"]) == 1
    assert "--parallel" in capsys.readouterr().err
    # DCP reshards: the 2-rank checkpoint continues in one process (a group of one)
    assert main(["train", "--out-dir", str(run), "--resume", "--max-steps", "14", "--no-progress"]) == 0
    assert "not bitwise" in capsys.readouterr().err
    resume = [e for e in read_metrics(run) if e["event"] == "resume"][-1]
    assert (resume["saved_world_size"], resume["world_size"]) == (2, 1)
    train = _train_events(run)
    assert sorted(train) == list(range(1, 15)) and train[14]["train_loss"] < train[1]["train_loss"]


def test_one_process_fsdp_equals_a_plain_run_and_resumes(corpus, tmp_path):
    """Without torchrun, --parallel fsdp shards over a group of one: same losses as a plain run, DCP checkpoints."""
    assert main(_args(corpus, tmp_path, "plain", "sophiag", 6)) == 0
    assert main(_args(corpus, tmp_path, "one", "sophiag", 4, "--parallel", "fsdp")) == 0
    assert main(["train", "--out-dir", str(tmp_path / "one"), "--resume", "--max-steps", "6", "--lr-decay-steps",
                 "6", "--no-progress"]) == 0
    a, b = _train_events(tmp_path / "plain"), _train_events(tmp_path / "one")
    assert sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step]["train_loss"] == pytest.approx(a[step]["train_loss"], rel=1e-5), step
    assert list_checkpoints(tmp_path / "one")[0].name == "checkpoint-00000006.dcp"
    assert not torch.distributed.is_initialized()  # the group of one was closed


_UNIFORM_DTYPE_SCRIPT = """
import torch, torch.distributed as dist
from sophia.lm import parallel
from sophia.lm.model import GPT, GPTConfig
dist.init_process_group("gloo")
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
parallel.shard_gpt(model, torch.device("cpu"), bf16_params=True)
seen = {}
model.register_forward_pre_hook(lambda m, a, kw: seen.update(u=kw["sample_uniform"].dtype), with_kwargs=True)
model(torch.randint(0, 50, (2, 16)), sample_uniform=torch.rand(2, 16))
print("UNIFORM", seen["u"])
parallel.close_process_group()
"""


def test_the_sampled_label_uniforms_reach_the_forward_in_float32_under_bf16_fsdp(tmp_path):
    """The GPU policy (bfloat16 parameters) casts a sharded module's float inputs; Sophia-G's uniform numbers
    must not be (8 bits would skew the sampled labels), so the root shard keeps its inputs as given."""
    script = tmp_path / "uniform_dtype.py"
    script.write_text(_UNIFORM_DTYPE_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(script)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, _why(proc)
    assert "UNIFORM torch.float32" in proc.stdout, proc.stdout[-2000:]


_NAN_ON_ONE_SHARD_SCRIPT = """
import sys, torch, torch.distributed as dist
from sophia.lm import parallel
from sophia.lm.config import resolve_config
from sophia.lm.train import Trainer

corpus, data_root, out = sys.argv[1:4]


def nan_in_one_shard(grad_norm):
    # after the backward of step 4, one entry of rank 1's own gradient shard turns NaN (the other rank's
    # shards stay finite): only a collective decision can make every rank skip
    def patched(params, clip):
        params = list(params)
        if t.counters["step"] == 3 and dist.get_rank() == 1:
            for p in params:
                shard = parallel.local(p.grad)
                if shard.numel():
                    shard.view(-1)[0] = float("nan")
                    break
        return grad_norm(params, clip)
    return patched


cfg = resolve_config("tiny", "sophiag", {
    "max_steps": 6, "corpus": corpus, "data_root": data_root, "n_layer": 2, "n_head": 2, "n_embd": 16,
    "block_size": 16, "batch_size": 4, "grad_accum": 4, "eval_batches": 2, "warmup_steps": 2, "log_every": 1,
    "progress": False, "hessian_interval": 5, "checkpoint_every": 100, "parallel": "fsdp"})
cfg.out_dir = out
t = Trainer(cfg, log=lambda m: None)
t.setup()
t.dist.grad_norm = nan_in_one_shard(t.dist.grad_norm)  # the parallel part computes the global gradient norm


def everything():  # the whole weights and optimizer state (collectives, in the same order on every rank)
    out = [parallel.full(p.detach()).clone() for p in t.raw_model.parameters()]
    for st in t.opt.state.values():
        out += [parallel.full(v).clone() for v in st.values() if torch.is_tensor(v)]
    return out


steps = [t.train_step(i)[2] for i in range(3)]
before = everything()
skipped = t.train_step(3)[2]
same = all(torch.equal(a, b) for a, b in zip(before, everything()))
after = t.train_step(4)[2]
finite = all(torch.isfinite(x).all() for x in everything())
print(f"RANK {dist.get_rank()} early={steps} skipped={skipped} same={same} next={after} finite={finite}", flush=True)
t.dist.close()
"""


def test_a_non_finite_gradient_in_one_shard_is_skipped_by_every_rank(corpus, tmp_path):
    """Under FSDP each rank holds its own gradient shard: a NaN in one rank's shard must make every rank skip the
    step (weights and Sophia-G's state unchanged everywhere), and the next step proceeds. 2 ranks, torchrun."""
    script = tmp_path / "nan_shard.py"
    script.write_text(_NAN_ON_ONE_SHARD_SCRIPT)
    assert main(["data", "prepare", str(corpus), "--tokenizer", "byte", "--data-root", str(tmp_path / "data")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(corpus), str(tmp_path / "data"), str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _why(proc)
    for rank in (0, 1):
        want = f"RANK {rank} early=[False, False, False] skipped=True same=True next=False finite=True"
        assert want in proc.stdout, proc.stdout[-2000:] + _why(proc)


def test_bad_combinations_are_refused(corpus, tmp_path, capsys):
    for optimizer in ("adahessian", "muon"):
        capsys.readouterr()
        assert main(_args(corpus, tmp_path, f"bad-{optimizer}", optimizer, 2, "--parallel", "fsdp")) == 1
        err = capsys.readouterr().err
        assert "--parallel fsdp does not support" in err and "--parallel ddp" in err
    assert main(_args(corpus, tmp_path, "bad-p", "adamw", 2, "--parallel", "zero3")) == 1
    assert "--parallel must be ddp or fsdp" in capsys.readouterr().err


# -- the 1.5B preset and the memory plan ------------------------------------------------------------------------
def test_gpt2_xl_preset_and_its_parameter_count():
    p = PRESETS["gpt2-xl"]
    assert (p["n_layer"], p["n_head"], p["n_embd"], p["parallel"]) == (48, 25, 1600, "fsdp")
    d, V = 1600, 50304
    by_hand = 48 * (12 * d * d + 2 * d) + d + V * d + 1024 * d  # blocks, ln_f, tied embedding, positions
    cfg = GPTConfig(block_size=1024, vocab_size=50257, n_layer=48, n_head=25, n_embd=d, bias=False,
                    vocab_pad_multiple=64)
    with torch.device("meta"):
        n = GPT(cfg).num_parameters(non_embedding=False)
    assert n == by_hand == gpt_parameters(48, d, V, 1024, False) == 1_556_840_000
    opts = p["optimizers"]
    assert (opts["sophiag"]["lr"], opts["sophiag"]["rho"], opts["sophiag"]["weight_decay"]) == (2e-4, 0.04, 0.15)
    assert (opts["adamw"]["lr"], opts["adamw"]["weight_decay"]) == (1.2e-4, 0.1)


def test_fsdp_memory_plan(capsys):
    shape = dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab=50304, batch_size=12, optimizer="adamw",
                 bf16=True, cuda=True, micro_batches=5)
    ddp = estimate(world_size=8, **shape)
    fsdp = estimate(world_size=8, parallel="fsdp", **shape)
    n = ddp.parameters
    assert ddp.static == (4 + 4 + 8 + 2 + 4) * n
    # sharded weights, grads, AdamW state; bf16 unsharded grads across micro-batches; gathered root + 2 blocks
    root = n - 48 * (12 * 1600**2 + 2 * 1600)
    assert fsdp.static == -(-16 * n // 8) + 2 * n + 2 * (root + 2 * (12 * 1600**2 + 2 * 1600))
    assert fsdp.activations == ddp.activations
    ac = estimate(world_size=8, parallel="fsdp", activation_checkpointing=True, **shape)
    s, d = 12 * 1024, 1600
    assert ac.activations == 48 * 4 * s * d + 38 * s * d + 8 * s * d  # fp32 block inputs, one block recomputed
    capsys.readouterr()
    assert main(["train", "--dry-run", "--json", "--preset", "gpt2-xl", "--optimizer", "adamw", "--parallel", "ddp",
                 "--device", "cuda", "--device-memory-gib", "80", "--world-size", "8"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is False and plan["advice"].startswith("--parallel fsdp")
    assert plan["memory_fsdp_gib"] * GiB < 0.9 * 80 * GiB < plan["memory_gib"] * GiB
    assert main(["train", "--dry-run", "--preset", "gpt2-xl", "--device", "cuda", "--device-memory-gib", "80",
                 "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "FSDP2" in out and "fits       yes" in out


def test_sigterm_writes_a_sharded_checkpoint_and_stops(corpus, tmp_path):
    args = _args(corpus, tmp_path, "term", "sophiag", 400, "--parallel", "fsdp", "--checkpoint-every", "1000")
    proc = subprocess.Popen([sys.executable, "-m", "sophia", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 200
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"train"') >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    newest = list_checkpoints(tmp_path / "term")[0]
    step = load_checkpoint(tmp_path / "term")["step"]
    assert newest.name == f"checkpoint-{step:08d}.dcp" and 5 <= step < 400
    stopped = [e for e in read_metrics(tmp_path / "term") if e["event"] == "stopped"]
    assert stopped and stopped[0]["step"] == step
    resumed = _cli(["train", "--out-dir", str(tmp_path / "term"), "--resume", "--max-steps", str(step + 2),
                    "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
