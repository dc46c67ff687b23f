"""SophiaTrainer against the real transformers.Trainer, with a tiny GPT-2 built from a GPT2Config."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainerCallback  # noqa: E402

from sophia import SophiaG, SophiaH  # noqa: E402
from sophia.integrations.transformers import SophiaTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hf_trainer_gpt2.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("hf_trainer_gpt2_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ex = _load_example()


class RecordingCollator:
    """The example's collator, keeping every batch it makes, in order."""

    def __init__(self):
        self.batches = []

    def __call__(self, features):
        batch = ex.collate(features)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


class GradsBeforeStep(TrainerCallback):
    """The gradients the optimizer is about to use, at every optimizer step."""

    def __init__(self, model):
        self.model, self.grads = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append([None if p.grad is None else p.grad.detach().clone() for p in self.model.parameters()])


def _train_losses(trainer):
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


def test_refreshes_follow_optimizer_steps_under_accumulation_and_count_real_predictions(tmp_path):
    k, steps, accumulation = 3, 10, 2
    trainer = ex.build_trainer(str(tmp_path), max_steps=steps, batch_size=4, accumulation=accumulation,
                               hessian_interval=k, logging_steps=1, n_examples=128)
    collator = RecordingCollator()
    trainer.data_collator = collator
    trainer.train()
    opt = trainer.sophia_optimizer
    assert isinstance(opt, SophiaG)
    assert opt.hessian_updates == steps // k == 3
    assert [s for s, _ in trainer.hessian_refreshes] == [3, 6, 9]  # after optimizer steps k, 2k, 3k
    # N: labels that are not -100, shifted as GPT-2's loss shifts them, over the step's micro-batches
    batches = collator.batches[:steps * accumulation]
    for step, n in trainer.hessian_refreshes:
        window = batches[(step - 1) * accumulation: step * accumulation]
        assert n == sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        assert n < sum(b["labels"][:, 1:].numel() for b in window)  # padding was there to leave out
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == steps
    assert all(0.0 <= e["win_rate"] <= 1.0 and e["hessian_norm"] >= 0 for e in logs)
    assert [e["hessian_updates"] for e in logs] == [s // k for s in range(1, steps + 1)]
    assert logs[0]["hessian_norm"] == 0 and logs[-1]["hessian_norm"] > 0
    first, last = sum(e["loss"] for e in logs[:3]) / 3, sum(e["loss"] for e in logs[-3:]) / 3
    assert last < first - 0.1


def test_optimizer_uses_trainers_lr_decay_split_and_sophias_betas(tmp_path):
    trainer = ex.build_trainer(str(tmp_path), max_steps=1, rho=0.07)
    trainer.create_optimizer()
    opt = trainer.sophia_optimizer
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == trainer.args.weight_decay == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all("bias" in names[id(p)] or "ln" in names[id(p)] for p in no_decay["params"])
    assert decay["lr"] == trainer.args.learning_rate and decay["rho"] == 0.07
    assert decay["betas"] == (0.965, 0.99)  # Sophia's, not TrainingArguments' adam betas
    custom = SophiaTrainer(model=ex.tiny_gpt2(), args=trainer.args, betas=(0.9, 0.95))
    custom.create_optimizer()
    assert custom.sophia_optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="hessian_interval"):
        SophiaTrainer(model=ex.tiny_gpt2(), args=trainer.args, hessian_interval=0)
    with pytest.raises(ValueError, match="sophia must be"):
        SophiaTrainer(model=ex.tiny_gpt2(), args=trainer.args, sophia="adamw")



def test_a_sophia_optimizer_passed_in_is_used_as_given(tmp_path):
    trainer = ex.build_trainer(str(tmp_path), max_steps=4, hessian_interval=2, n_examples=32)
    mine = SophiaG(trainer.model.parameters(), lr=1e-3, rho=0.02, hessian_interval=2)
    given = SophiaTrainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                          data_collator=ex.collate, optimizers=(mine, None), hessian_interval=2)
    given.train()
    assert given.sophia_optimizer is mine and mine.hessian_updates == 2
    assert mine.param_groups[0]["rho"] == 0.02
    wrong = SophiaTrainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                          data_collator=ex.collate, optimizers=(SophiaH(trainer.model.parameters()), None))
    with pytest.raises(ValueError, match="needs a SophiaG"):
        wrong.train()

def test_training_gradients_are_the_same_with_and_without_refreshes(tmp_path):
    # lr = 0 keeps the parameters fixed, so every step's training gradient depends on the data only:
    # a refresh that leaked its sampled-label gradient into .grad would change the next step's.
    grads = {}
    for k in (1, 1000):
        trainer = ex.build_trainer(str(tmp_path / str(k)), max_steps=3, batch_size=4, accumulation=2,
                                   hessian_interval=k, lr=0.0, n_examples=64)
        probe = GradsBeforeStep(trainer.model)
        trainer.add_callback(probe)
        trainer.train()
        assert trainer.sophia_optimizer.hessian_updates == 3 // k
        grads[k] = probe.grads
    assert len(grads[1]) == len(grads[1000]) == 3
    for with_refresh, without in zip(grads[1], grads[1000]):
        for a, b in zip(with_refresh, without):
            assert torch.equal(a, b)


def test_resume_from_checkpoint_continues_as_the_uninterrupted_run(tmp_path):
    # k = 2 and a checkpoint every 2 steps: checkpoint-2 is written right after a refresh
    kw = dict(max_steps=6, batch_size=4, accumulation=2, hessian_interval=2, save_steps=2, logging_steps=1,
              n_examples=64)
    full = ex.build_trainer(str(tmp_path / "full"), **kw)
    full.train()
    resumed = ex.build_trainer(str(tmp_path / "resumed"), **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    want = [(s, loss) for s, loss in _train_losses(full) if s > 2]
    assert len(want) == 4
    # the resumed log history starts with the checkpoint's; after it, the same floats exactly
    assert [(s, loss) for s, loss in _train_losses(resumed) if s > 2] == want
    assert resumed.sophia_optimizer.hessian_updates == full.sophia_optimizer.hessian_updates == 3
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(full.sophia_optimizer.state[p]["hessian"], resumed.sophia_optimizer.state[q]["hessian"])


class FirstOrderGrads(TrainerCallback):
    def __init__(self, model):
        self.model, self.checked = model, 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        assert not any(p.grad.requires_grad for p in self.model.parameters() if p.grad is not None)
        self.checked += 1


def test_sophiah_refreshes_through_the_closure_estimator_with_first_order_training(tmp_path):
    k, steps = 2, 5
    trainer = ex.build_trainer(str(tmp_path), sophia="sophiah", max_steps=steps, batch_size=4, accumulation=2,
                               hessian_interval=k, rho=0.01, logging_steps=1, n_examples=64)
    probe = FirstOrderGrads(trainer.model)
    trainer.add_callback(probe)
    trainer.train()
    opt = trainer.sophia_optimizer
    assert isinstance(opt, SophiaH) and probe.checked == steps
    # SophiaH's own schedule: refreshed on steps k+1, 2k+1, ... (folded in and used by that step)
    assert opt.hessian_updates == (steps - 1) // k == 2
    hs = torch.cat([s["hessian"].flatten() for s in opt.state.values()])
    assert (hs < 0).any() and (hs > 0).any()  # Hutchinson estimates carry both signs


def test_example_runs_in_quick_form(capsys):
    result = ex.main(["--quick", "--max-steps", "10", "--hessian-interval", "5"])
    assert result["steps"] == 10 and result["hessian_updates"] == 2
    assert result["losses"][-1] < result["losses"][0]
    assert "Hessian refreshes" in capsys.readouterr().out


WORKER = Path(__file__).with_name("hf_ddp_worker.py")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_gloo_ranks_agree_and_count_the_global_batch(tmp_path):
    # one torchrun launch: a SophiaG run, then a SophiaH run
    path = os.pathsep.join(filter(None, [str(ROOT / "examples"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"sophiag-rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["hessian_updates"] == ranks[1]["hessian_updates"] == 6 // 2
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0]["hessian"], ranks[1]["hessian"]):  # sampled gradients were summed over ranks
        assert torch.equal(a, b)
    assert all(h.abs().sum() > 0 for h in ranks[0]["hessian"])
    assert ranks[0]["refreshes"] == ranks[1]["refreshes"]
    for step, n in ranks[0]["refreshes"]:  # N counts both ranks' predictions of that step
        assert n == sum(r["counts"][step - 1] for r in ranks)
    assert ranks[0]["counts"] != ranks[1]["counts"]  # the ranks did see different data
    # SophiaH: each rank's Hutchinson estimate (its own data and probes) is averaged over ranks
    ranks = [torch.load(tmp_path / f"sophiah-rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["hessian_updates"] == ranks[1]["hessian_updates"] == (6 - 1) // 2
    for a, b in zip(ranks[0]["hessian"] + ranks[0]["params"], ranks[1]["hessian"] + ranks[1]["params"]):
        assert torch.equal(a, b)


def test_bf16_autocast_on_cpu_refreshes_with_finite_estimates(tmp_path):
    # The refresh's forward runs under the training's autocast (accelerate's); CUDA is not available here.
    trainer = ex.build_trainer(str(tmp_path), max_steps=4, batch_size=4, accumulation=2, hessian_interval=2,
                               n_examples=32, bf16=True)
    in_refresh, dtypes = [], []
    sampled_loss = trainer.sampled_loss

    def spy(model, inputs, generator=None):
        in_refresh.append(True)
        try:
            return sampled_loss(model, inputs, generator)
        finally:
            in_refresh.pop()

    trainer.sampled_loss = spy
    trainer.model.lm_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype) if in_refresh else None)
    trainer.train()
    assert dtypes == [torch.bfloat16] * 4  # 2 refreshes x 2 micro-batches, under autocast
    opt = trainer.sophia_optimizer
    assert opt.hessian_updates == 2 and opt.hessian_skipped == 0
    hs = torch.cat([s["hessian"].flatten() for s in opt.state.values()])
    assert torch.isfinite(hs).all() and (hs >= 0).all() and hs.sum() > 0


def test_the_optimizer_keeps_the_schedule_and_a_conflicting_interval_is_refused(tmp_path):
    trainer = ex.build_trainer(str(tmp_path), max_steps=4, hessian_interval=2, n_examples=32)
    assert trainer.create_optimizer().param_groups[0]["hessian_interval"] == 2
    own = SophiaG(trainer.model.parameters(), lr=1e-3, hessian_interval=3)
    follows = SophiaTrainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                            data_collator=ex.collate, optimizers=(own, None))  # no hessian_interval: the optimizer's
    follows.train()
    assert [s for s, _ in follows.hessian_refreshes] == [3] and own.hessian_updates == 1
    clash = SophiaTrainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                          data_collator=ex.collate, hessian_interval=2,
                          optimizers=(SophiaG(trainer.model.parameters(), hessian_interval=5), None))
    with pytest.raises(ValueError, match=r"refreshes every \[5\] steps.*hessian_interval=2"):
        clash.train()
