"""The GPU-ready harness, tested on CPU: the memory estimate and --dry-run, non-finite steps, rotated finite
checkpoints, --resume auto, schedule changes on resume, a 2 -> 1 rank resume, sharded evaluation, the padded
vocabulary, SIGTERM."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sophia.cli import main
from sophia.hessian import categorical_sampled_loss, sample_categorical, sample_categorical_from_uniform
from sophia.hessian.refresh import label_generator
from sophia.lm.checkpoint import list_checkpoints
from sophia.lm.config import resolve_config
from sophia.lm.memory import GiB, estimate, gpt_parameters
from sophia.lm.metrics import read_metrics
from sophia.lm.model import GPT, GPTConfig
from sophia.lm.presets import PRESETS
from sophia.lm.train import Trainer, all_finite

SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
         "--eval-batches", "3", "--warmup-steps", "3", "--log-every", "1", "--no-progress"]




def _args(corpus: Path, tmp: Path, out: str, optimizer: str, steps: int, *extra: str) -> list[str]:
    return ["train", "--optimizer", optimizer, "--max-steps", str(steps), "--out-dir", str(tmp / out),
            "--corpus", str(corpus), "--data-root", str(tmp / "data"), *SMALL, *extra]


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "sophia", *args], env=env, capture_output=True, text=True,
                          timeout=300, **kw)


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "sophia", *args], env=env, capture_output=True, text=True, timeout=300)


# -- memory ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_formula_matches_the_model(preset):
    p = PRESETS[preset]
    vocab = {"byte": 256, "bpe:4096": 4096, "gpt2": 50257}[p["tokenizer"]]
    for qk_norm in (False, True):
        cfg = GPTConfig(block_size=p["block_size"], vocab_size=vocab, n_layer=p["n_layer"], n_head=p["n_head"],
                        n_embd=p["n_embd"], bias=p["bias"], qk_norm=qk_norm, vocab_pad_multiple=64)
        with torch.device("meta"):
            n = GPT(cfg).num_parameters(non_embedding=False)
        assert n == gpt_parameters(p["n_layer"], p["n_embd"], cfg.padded_vocab_size, p["block_size"], p["bias"],
                                   qk_norm, p["n_head"])


def test_estimate_of_gpt2_large_by_hand():
    # A count by hand at the authors' micro-batch (12 x 1024, bf16, DDP): activations ~21.5 GB,
    # logits + loss ~6-9 GB, weights + grads + optimizer state ~12.4 GB (+ bf16 weight copies), buckets ~3 GB.
    n = 36 * (12 * 1280**2 + 2 * 1280) + 1280 + 50304 * 1280 + 1024 * 1280
    s = 12 * 1024
    want = ((4 + 4 + 8 + 2 + 4) * n                       # weights, grads, AdamW state, bf16 copies, DDP buckets
            + 36 * 38 * s * 1280 + 8 * s * 1280             # saved activations
            + (2 + 12) * s * 50304                          # bf16 logits, fp32 log-softmax, two fp32 gradients
            + GiB)                                          # CUDA context and workspaces
    est = estimate(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab=50304, batch_size=12,
                   optimizer="adamw", bf16=True, world_size=8, cuda=True)
    assert est.parameters == n == 773_582_080
    assert est.total == want
    assert 40 * GiB < est.total < 50 * GiB
    assert 20e9 < est.activations < 23e9


@pytest.mark.parametrize("optimizer", ["adamw", "sophiag"])
def test_estimate_within_25_percent_of_the_measured_cpu_peak(optimizer):
    shape = dict(n_layer=3, n_head=4, n_embd=256, block_size=128, vocab=4096, batch_size=16)
    code = ("import json; from sophia.lm.memory import measure_peak_bytes; "
            f"print(json.dumps(measure_peak_bytes(optimizer={optimizer!r}, **{shape!r})))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout)
    est = estimate(optimizer=optimizer, bf16=False, **shape).total
    assert abs(est - measured) <= 0.25 * measured, (est / 2**20, measured / 2**20)


def _dry(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["train", "--dry-run", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_dry_run_every_preset(preset, tmp_path, capsys):
    optimizers = ["adamw", "sophiag", "sophiah"] if preset.startswith("gpt2") else ["sophiag"]
    for optimizer in optimizers:
        plan = _dry(capsys, "--preset", preset, "--optimizer", optimizer, "--device", "cuda",
                    "--device-memory-gib", "80", "--world-size", "8", "--data-root", str(tmp_path / "nothing"))
        assert {"parameters", "tokens_per_step", "memory_gib", "fits"} <= set(plan)
        p = PRESETS[preset]
        assert plan["tokens_per_step"] == p["batch_size"] * p["block_size"] * max(p["grad_accum"], 8)
        assert plan["fits"] is True, plan  # the authors' settings fit an 80 GiB device under DDP
    assert not (tmp_path / "nothing").exists()  # no data touched


def test_dry_run_refuses_the_impossible_and_text_mode(tmp_path, capsys):
    plan = _dry(capsys, "--preset", "gpt2-large", "--optimizer", "adamw", "--batch-size", "64", "--device", "cuda",
                "--device-memory-gib", "80", "--world-size", "8")
    assert plan["fits"] is False and plan["memory_gib"] > 72
    assert "--batch-size" in plan["advice"] and "--grad-accum" in plan["advice"]
    proc = _cli(["train", "--dry-run", "--preset", "gpt2-medium", "--device", "cuda", "--device-memory-gib", "80"])
    assert proc.returncode == 0 and "GiB per device" in proc.stdout and "fits       yes" in proc.stdout


def test_refusal_names_the_estimate_and_the_flags(corpus, tmp_path, capsys):
    args = _args(corpus, tmp_path, "big", "adamw", 1, "--device-memory-gib", "0.3", "--batch-size", "64",
                 "--block-size", "128", "--n-embd", "256", "--n-layer", "4")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "GiB" in err and "--batch-size" in err and "--grad-accum" in err and "--no-memory-check" in err
    assert not (tmp_path / "big").exists()
    assert main([*args, "--no-memory-check"]) == 0


# -- non-finite steps and checkpoints ---------------------------------------------------------------------------
class _NaNOnce(Trainer):
    """A Trainer whose gradient turns NaN on the steps listed (through a hook on one weight)."""

    def __init__(self, cfg, bad_steps, **kw):
        super().__init__(cfg, **kw)
        self.bad_steps = set(bad_steps)

    def setup(self):
        super().setup()
        w = self.raw_model.blocks[0].mlp[0].weight

        def hook(g):
            return g * float("nan") if self.counters["step"] in self.bad_steps else g

        w.register_hook(hook)


def _cfg_obj(corpus, tmp, out, optimizer, steps, **over):
    cfg = resolve_config("tiny", optimizer, {
        "max_steps": steps, "corpus": str(corpus), "data_root": str(tmp / "data"), "n_layer": 1, "n_head": 2,
        "n_embd": 16, "block_size": 16, "batch_size": 4, "eval_batches": 2, "warmup_steps": 2, "log_every": 1,
        "progress": False, "hessian_interval": 2, "checkpoint_every": 100, **over})
    cfg.out_dir = str(tmp / out)
    return cfg


def _state(t: Trainer) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in t.raw_model.parameters()]
    for st in t.opt.state.values():
        out += [v.clone() for v in st.values() if torch.is_tensor(v)]
    return out


@pytest.mark.parametrize("optimizer", ["sophiag", "adamw"])
def test_a_non_finite_gradient_is_skipped_with_state_unchanged_and_logged(corpus, tmp_path, optimizer):
    t = _NaNOnce(_cfg_obj(corpus, tmp_path, "nan", optimizer, 6), bad_steps=[3], log=lambda m: None)
    t.setup()
    for i in range(3):
        assert t.train_step(i)[2] is False
    before = _state(t)
    _, _, skipped = t.train_step(3)  # the gradient of step 4 is NaN
    assert skipped and t.counters["skipped_steps"] == 1 and t.consecutive_skips == 1
    after = _state(t)
    # SophiaG refreshes its estimate after step 4 (k = 2), which changes the Hessian EMA only: compare the rest
    if optimizer == "sophiag":
        before, after = before[: sum(1 for _ in t.raw_model.parameters())], after[: len(before)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.isfinite(p).all() for p in t.raw_model.parameters())
    assert t.train_step(4)[2] is False and t.consecutive_skips == 0
    # and through the loop: logged as a "skipped" event, the run completes
    t2 = _NaNOnce(_cfg_obj(corpus, tmp_path, "nan-loop", optimizer, 6), bad_steps=[2], log=lambda m: None)
    summary = t2.run()
    events = read_metrics(tmp_path / "nan-loop")
    skips = [e for e in events if e["event"] == "skipped"]
    assert [e["step"] for e in skips] == [3] and not math.isfinite(skips[0]["grad_norm"])
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6


def test_sophiag_skipped_step_leaves_its_momentum_and_hessian_alone(corpus, tmp_path):
    t = _NaNOnce(_cfg_obj(corpus, tmp_path, "nan-h", "sophiag", 6, hessian_interval=5), bad_steps=[1],
                 log=lambda m: None)
    t.setup()
    t.train_step(0)
    before = _state(t)
    assert t.train_step(1)[2] is True  # no refresh after step 2 with k = 5: nothing at all may change
    assert all(torch.equal(a, b) for a, b in zip(before, _state(t)))


def test_a_diverging_run_keeps_finite_checkpoints_and_resumes_with_a_lower_lr(corpus, tmp_path):
    run = tmp_path / "div"
    args = _args(corpus, tmp_path, "div", "sgd", 30, "--lr", "1e8", "--min-lr", "1e7", "--grad-clip", "0",
                 "--checkpoint-every", "100", "--max-skipped-steps", "3", "--warmup-steps", "0")
    proc = _cli(args)
    assert proc.returncode == 1, proc.stderr
    assert "diverged" in proc.stderr or "not finite" in proc.stderr
    assert "--resume" in proc.stderr and "--lr" in proc.stderr
    ckpts = list_checkpoints(run)
    assert ckpts
    for path in ckpts:
        ck = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in ck["model"].values()), path
    assert any(e["event"] == "diverged" for e in read_metrics(run))
    proc = _cli(["train", "--out-dir", str(run), "--resume", "--lr", "0.05", "--min-lr", "0.005",
                 "--max-skipped-steps", "3", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    events = read_metrics(run)
    resume = [e for e in events if e["event"] == "resume"][-1]
    assert resume["changes"]["lr"] == {"was": 1e8, "now": 0.05}
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[-1]["step"] == 30 and math.isfinite(evals[-1]["val_loss"])


def test_checkpoints_rotate_and_a_damaged_newest_falls_back(corpus, tmp_path, capsys):
    run = tmp_path / "rot"
    assert main(_args(corpus, tmp_path, "rot", "adamw", 8, "--checkpoint-every", "2", "--keep-checkpoints",
                      "3")) == 0
    assert [p.name for p in list_checkpoints(run)] == [f"checkpoint-{s:08d}.pt" for s in (8, 6, 4)]
    newest = list_checkpoints(run)[0]
    newest.write_bytes(newest.read_bytes()[:100])  # torn
    capsys.readouterr()
    assert main(["train", "--out-dir", str(run), "--resume", "--max-steps", "9", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "corrupt" in err and "checkpoint-00000006.pt" in err
    assert torch.load(list_checkpoints(run)[0], weights_only=True)["step"] == 9


def test_resume_auto_starts_fresh_then_resumes_after_sigkill(corpus, tmp_path):
    args = _args(corpus, tmp_path, "auto", "adamw", 40, "--checkpoint-every", "4", "--resume", "auto")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sophia", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    metrics = tmp_path / "auto" / "metrics.jsonl"
    deadline = time.time() + 200
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"train"') >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = _cli(args)  # the same command, as torchrun --max-restarts would repeat it
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stderr
    events = read_metrics(tmp_path / "auto")
    assert sorted(e["step"] for e in events if e["event"] == "train") == list(range(1, 41))


def test_max_steps_on_resume_keeps_the_schedule_length(corpus, tmp_path):
    assert main(_args(corpus, tmp_path, "sched", "adamw", 6, "--lr", "1e-2", "--min-lr", "1e-3")) == 0
    assert main(["train", "--out-dir", str(tmp_path / "sched"), "--resume", "--max-steps", "10",
                 "--no-progress"]) == 0
    events = read_metrics(tmp_path / "sched")
    lrs = {e["step"]: e["lr"] for e in events if e["event"] == "train"}
    assert all(lrs[s] == pytest.approx(1e-3) for s in range(7, 11))  # at min_lr, not back up the cosine
    resume = [e for e in events if e["event"] == "resume"][0]
    assert resume["changes"]["max_steps"] == {"was": 6, "now": 10}
    assert resume["changes"]["lr_decay_steps"] == {"was": None, "now": 6}


def test_nothing_to_do_is_said(corpus, tmp_path, capsys):
    assert main(_args(corpus, tmp_path, "done", "adamw", 3)) == 0
    before = (tmp_path / "done" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--out-dir", str(tmp_path / "done"), "--resume", "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (tmp_path / "done" / "metrics.jsonl").read_text() == before


def test_a_fresh_run_keeps_an_earlier_metrics_log(corpus, tmp_path):
    run = tmp_path / "keep"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "event": "start", "mine": true}\n')
    assert main(_args(corpus, tmp_path, "keep", "adamw", 2)) == 0
    kept = list(run.glob("metrics.jsonl.*.old"))
    assert len(kept) == 1 and '"mine": true' in kept[0].read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_continue(corpus, tmp_path, sig):
    args = _args(corpus, tmp_path, "term", "adamw", 400, "--checkpoint-every", "1000")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sophia", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 200
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"train"') >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    step = torch.load(list_checkpoints(tmp_path / "term")[0], weights_only=True)["step"]
    assert 5 <= step < 400
    stopped = [e for e in read_metrics(tmp_path / "term") if e["event"] == "stopped"]
    assert stopped and stopped[0]["step"] == step and stopped[0]["signal"] == sig.name
    resumed = _cli(["train", "--out-dir", str(tmp_path / "term"), "--resume", "--max-steps", str(step + 2),
                    "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr


def test_help_describes_the_override_flags_and_unused_settings_are_said(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert "Sophia's clipping threshold" in out and "default: the preset's, else 0.05" in out
    assert main(_args(corpus, tmp_path, "note", "adamw", 1, "--rho", "0.2", "--hessian-interval", "3")) == 0
    err = capsys.readouterr().err
    assert "--rho has no effect with --optimizer adamw" in err and "--hessian-interval has no effect" in err


# -- distributed ---------------------------------------------------------------------------------------------------
def test_sharded_evaluation_equals_one_process_and_2_to_1_rank_resume(corpus, tmp_path):
    common = ("--eval-every", "4", "--checkpoint-every", "4", "--grad-accum", "2", "--eval-batches", "3")
    # 2 ranks straight to 8 steps; 2 ranks to 4 steps then 1 rank from there to 8
    straight = _torchrun(2, _args(corpus, tmp_path, "two", "adamw", 8, *common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    half = _torchrun(2, _args(corpus, tmp_path, "mixed", "adamw", 4, *common))
    assert half.returncode == 0, half.stderr[-3000:]
    one = _cli(["train", "--out-dir", str(tmp_path / "mixed"), "--resume", "--max-steps", "8",
                "--lr-decay-steps", "8", "--no-progress"])
    assert one.returncode == 0, one.stderr
    assert "not bitwise" in one.stderr
    # a single process from scratch, for the step-0 evaluation
    single = _cli(_args(corpus, tmp_path, "single", "adamw", 1, *common))
    assert single.returncode == 0, single.stderr
    ev = {name: [e for e in read_metrics(tmp_path / name) if e["event"] == "eval"]
          for name in ("two", "mixed", "single")}
    # rank 0 evaluates batches 0 and 2, rank 1 batch 1: the same mean as one process over all three
    assert ev["two"][0]["val_loss"] == pytest.approx(ev["single"][0]["val_loss"], rel=1e-6)
    # the 2 -> 1 rank run trained on the same windows: the same losses up to float summation order
    assert ev["mixed"][-1]["step"] == ev["two"][-1]["step"] == 8
    assert ev["mixed"][-1]["val_loss"] == pytest.approx(ev["two"][-1]["val_loss"], rel=1e-4)
    a = torch.load(list_checkpoints(tmp_path / "two")[0], weights_only=True)["model"]
    b = torch.load(list_checkpoints(tmp_path / "mixed")[0], weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# -- the padded vocabulary --------------------------------------------------------------------------------------
def test_padded_vocabulary_is_never_scored_sampled_or_generated():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=16, vocab_pad_multiple=64))
    assert model.wte.weight.shape[0] == 128
    with torch.no_grad():  # make the padded rows win every softmax if they were ever scored
        model.wte.weight[100:] = 50.0 * model.wte.weight[:28].sign()
        model.wte.weight[100:, ::2] *= -1
    x = torch.randint(0, 100, (8, 16))
    logits, loss = model(x, x)
    assert logits.shape[-1] == 100 and torch.isfinite(loss)
    loss.backward()
    assert torch.equal(model.wte.weight.grad[100:], torch.zeros(28, 16))  # no gradient reaches the padding
    sampled = categorical_sampled_loss(model(x)[0], generator=torch.Generator().manual_seed(0))
    assert sampled.n == 8 * 16
    labels = sample_categorical(model(x)[0].detach(), generator=torch.Generator().manual_seed(0))
    assert int(labels.max()) < 100
    for t in (0.5, 1.0, 5.0):
        ids = model.generate(x[:2, :4], 40, temperature=t, top_k=None, generator=torch.Generator().manual_seed(1))
        assert int(ids.max()) < 100


def test_the_sampled_label_loss_in_the_forward_matches_the_loss_outside_it():
    """`sophia train` refreshes Sophia-G with model(x, sample_uniform=u): the cross-entropy against labels drawn at
    u from the model's own softmax, over the real vocabulary only (the padded rows are never drawn)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=16, vocab_pad_multiple=64))
    x = torch.randint(0, 100, (8, 16))
    u = torch.rand(8, 16, generator=torch.Generator().manual_seed(3))
    logits, loss = model(x, sample_uniform=u)
    labels = sample_categorical_from_uniform(logits, u)
    want = F.cross_entropy(logits.detach().double().flatten(0, 1), labels.flatten())
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="not both"):
        model(x, x, sample_uniform=u)


def test_all_finite_reduces_flags_per_device():
    """The check before a checkpoint: optimizer state may hold CPU step counts beside device moments (a
    CUDA run once failed here stacking flags across devices); on CPU, finite, non-finite and empty tensors."""
    ok = [torch.ones(3), torch.tensor(2.0), torch.empty(0)]
    assert all_finite(ok)
    assert not all_finite(ok + [torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor(float("-inf")), torch.ones(2)])
    assert all_finite([])
    if torch.cuda.is_available():
        assert all_finite([torch.ones(2, device="cuda"), torch.tensor(1.0)])
        assert not all_finite([torch.ones(2, device="cuda"), torch.tensor(float("nan"))])


@pytest.mark.parametrize("fraction,forwards,rows", [(0.25, 1, 4), (0.5, 2, 4), (0.3, 4, 1)])
def test_a_refresh_on_a_fraction_uses_whole_micro_batches_when_it_can(corpus, tmp_path, fraction, forwards, rows):
    """With 4 micro-batches of 4 sequences, a quarter or a half of the batch is 1 or 2 micro-batches of the
    training shape; 0.3 is not whole, so each of the 4 shrinks to round(0.3 * 4) = 1 sequence. The Hessian EMA
    after the first refresh is (1 - b2) N g**2, with g recomputed here from the inputs and sampled labels."""
    cfg = _cfg_obj(corpus, tmp_path, f"frac{fraction}", "sophiag", 2, grad_accum=4, hessian_batch_fraction=fraction,
                   hessian_interval=2, grad_clip=0.0)
    t = Trainer(cfg, log=lambda m: None)
    t.setup()
    t.train_step(0)
    seen: list[tuple[torch.Tensor, dict]] = []  # each forward's input and the weights it ran with
    hook = t.raw_model.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].clone(), {k: v.clone() for k, v in m.state_dict().items()})))
    passes = t.counters["hessian_passes"]
    t.train_step(1)  # step 2: its update, then the refresh (k = 2)
    hook.remove()
    refresh_inputs = [x for x, _ in seen[-forwards:]]
    assert len(seen) == 4 + forwards and all(x.shape == (rows, 16) for x in refresh_inputs)
    ref = GPT(t.raw_model.config)
    ref.load_state_dict(seen[-1][1])  # the weights the refresh saw: after step 2's update
    assert t.counters["hessian_passes"] - passes == pytest.approx(forwards * rows / 4)
    # independent g: mean sampled cross-entropy over the refresh's micro-batches, same label draws
    ref.zero_grad()
    for micro, x in enumerate(refresh_inputs):
        logits, _ = ref(x)
        # the label draws are keyed by (seed, the step the refresh follows, rank, micro-batch)
        u = torch.rand(x.shape, generator=label_generator(t.device, cfg.seed, 2, 0, micro))
        labels = sample_categorical_from_uniform(logits, u)  # the sampler itself: tests/hessian/test_hessian.py
        (F.cross_entropy(logits.flatten(0, 1), labels.flatten()) / forwards).backward()
    n = forwards * rows * 16
    b2 = t.opt.param_groups[0]["betas"][1]
    by_name = dict(t.raw_model.named_parameters())
    for name, p in ref.named_parameters():
        want = (1 - b2) * n * p.grad.double() ** 2
        got = t.opt.state[by_name[name]]["hessian"].double()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-12), name
