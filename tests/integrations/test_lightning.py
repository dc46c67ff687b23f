"""SophiaCallback against the real lightning.Trainer, with a tiny LightningModule."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

from torch.utils.data import DataLoader  # noqa: E402

from sophia.integrations.lightning import SophiaCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lightning_sophia.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("lightning_sophia_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ex = _load_example()


class Record(L.Callback):
    """Per batch: the loss; per optimizer step: the gradients as they are after all other callbacks."""

    def __init__(self):
        self.losses, self.grads, self.steps = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.steps.append(trainer.global_step)
        self.grads.append([p.grad.clone() for p in pl_module.parameters()])


def _fit(tmp, *, k=2, accumulate=2, epochs=3, n=48, lr=3e-3, ckpt_path=None, checkpoint=None, seed=0):
    L.seed_everything(seed, verbose=False)
    model = ex.TinyLM(lr=lr)
    callback = SophiaCallback(hessian_interval=k, logits_fn=ex.logits_and_labels)
    record = Record()
    extra = [record] + ([checkpoint] if checkpoint is not None else [])
    trainer = ex.make_trainer(str(tmp), callback=callback, accumulate=accumulate, max_epochs=epochs,
                              extra_callbacks=extra)
    data = DataLoader(ex.counting_data(n), batch_size=8, shuffle=False)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model, callback, record


def test_refreshes_follow_optimizer_steps_and_count_real_predictions(tmp_path):
    k, accumulate = 2, 3
    trainer, model, callback, record = _fit(tmp_path, k=k, accumulate=accumulate, epochs=2, n=56)
    # 7 batches an epoch: steps after batches 3, 6 and (the epoch's short last step) 7
    assert trainer.global_step == 6
    opt = trainer.optimizers[0]
    assert opt.hessian_updates == trainer.global_step // k == 3
    assert [s for s, _ in callback.refreshes] == [2, 4, 6]
    labels = [y for _, y in DataLoader(ex.counting_data(56), batch_size=8)]
    # step 2: batches 3-5 of epoch 1; step 4: batches 0-2 of epoch 2; step 6: its short last step
    windows = {2: labels[3:6], 4: labels[0:3], 6: labels[6:7]}
    for step, n in callback.refreshes:
        assert n == sum(int((y != -100).sum()) for y in windows[step])
        assert n < sum(y.numel() for y in windows[step])  # the padding was left out
    logged = trainer.logged_metrics
    assert 0.0 <= float(logged["win_rate"]) <= 1.0 and float(logged["hessian_norm"]) > 0
    assert float(logged["hessian_updates"]) == 3


def test_loss_falls(tmp_path):
    trainer, model, callback, record = _fit(tmp_path, k=2, accumulate=1, epochs=4, n=64, lr=1e-2)
    assert trainer.optimizers[0].hessian_updates == trainer.global_step // 2 == 16
    first, last = sum(record.losses[:4]) / 4, sum(record.losses[-4:]) / 4
    assert last < first - 0.3


def test_pending_training_gradients_survive_the_refresh(tmp_path):
    # Lightning zeroes .grad at the next step's first batch, so the refresh runs while the step's
    # training gradients are still there; with lr = 0 they depend on the data only.
    runs = {k: _fit(tmp_path / str(k), k=k, accumulate=2, epochs=1, n=32, lr=0.0) for k in (1, 1000)}
    with_refresh, without = runs[1][3], runs[1000][3]
    assert runs[1][0].optimizers[0].hessian_updates == 2 and runs[1000][0].optimizers[0].hessian_updates == 0
    assert len(with_refresh.grads) == len(without.grads) == 4
    for a, b in zip(with_refresh.grads, without.grads):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the resumed run has no ModelCheckpoint
def test_resume_from_a_lightning_checkpoint_continues_as_the_uninterrupted_run(tmp_path):
    # 3 optimizer steps an epoch, k = 2; the epoch-2 checkpoint is at step 6, right after a refresh
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1,
                                               every_n_epochs=1, filename="{epoch}")
    full, full_model, _, full_rec = _fit(tmp_path / "full", k=2, accumulate=2, epochs=3, checkpoint=ckpt)
    path = tmp_path / "ckpt" / "epoch=1.ckpt"
    assert torch.load(path, weights_only=False)["global_step"] == 6
    resumed, resumed_model, _, resumed_rec = _fit(tmp_path / "resumed", k=2, accumulate=2, epochs=3,
                                                  ckpt_path=str(path), seed=123)
    assert resumed_rec.losses == full_rec.losses[-6:]  # epoch 3's batches, the same floats
    assert resumed.optimizers[0].hessian_updates == full.optimizers[0].hessian_updates == 9 // 2
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_wrong_optimizer_is_refused(tmp_path):
    class AdamLM(ex.TinyLM):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    trainer = ex.make_trainer(str(tmp_path), callback=SophiaCallback(), max_epochs=1)
    with pytest.raises(TypeError, match="one SophiaG"):
        trainer.fit(AdamLM(), DataLoader(ex.counting_data(8), batch_size=8))
    with pytest.raises(ValueError, match="hessian_interval"):
        SophiaCallback(hessian_interval=0)


def test_example_runs_in_quick_form(capsys):
    result = ex.main(["--quick"])
    assert result["steps"] == 12 and result["hessian_updates"] == 6
    assert sum(result["losses"][-4:]) < sum(result["losses"][:4])
    assert "Hessian refreshes" in capsys.readouterr().out


WORKER = Path(__file__).with_name("lightning_ddp_worker.py")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_gloo_ranks_agree_and_count_the_global_batch(tmp_path):
    path = os.pathsep.join(filter(None, [str(ROOT / "examples"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["hessian_updates"] == ranks[1]["hessian_updates"] == ranks[0]["steps"] // 2 == 3
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0]["hessian"], ranks[1]["hessian"]):  # sampled gradients were summed over ranks
        assert torch.equal(a, b)
    assert ranks[0]["refreshes"] == ranks[1]["refreshes"]
    for step, n in ranks[0]["refreshes"]:
        assert n == sum(r["counts"][step - 1] for r in ranks)
    assert ranks[0]["counts"] != ranks[1]["counts"]


def test_bf16_mixed_precision_on_cpu_refreshes_with_finite_estimates(tmp_path):
    L.seed_everything(0, verbose=False)
    callback = SophiaCallback(hessian_interval=2, logits_fn=ex.logits_and_labels)
    in_refresh, dtypes = [], []
    sampled_loss = callback.sampled_loss

    def spy(pl_module, batch, generator):
        in_refresh.append(True)
        try:
            return sampled_loss(pl_module, batch, generator)
        finally:
            in_refresh.pop()

    callback.sampled_loss = spy
    model = ex.TinyLM()
    model.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype) if in_refresh else None)
    trainer = ex.make_trainer(str(tmp_path), callback=callback, accumulate=2, max_epochs=1, precision="bf16-mixed")
    trainer.fit(model, DataLoader(ex.counting_data(32), batch_size=8))
    assert dtypes == [torch.bfloat16] * 2  # 1 refresh x 2 batches, under the precision plugin's autocast
    opt = trainer.optimizers[0]
    assert opt.hessian_updates == 1 and opt.hessian_skipped == 0
    hs = torch.cat([s["hessian"].flatten() for s in opt.state.values()])
    assert torch.isfinite(hs).all() and (hs >= 0).all() and hs.sum() > 0


def test_works_with_the_pytorch_lightning_package_name_too():
    pl = pytest.importorskip("pytorch_lightning")
    from sophia import SophiaG

    class PlLM(pl.LightningModule):  # the same model, as a pytorch_lightning module
        def __init__(self):
            super().__init__()
            self.lm = ex.TinyLM()

        def forward(self, inputs):
            return self.lm(inputs)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]).flatten(0, 1), batch[1].flatten())

        def configure_optimizers(self):
            return SophiaG(self.parameters(), lr=1e-3)

    callback = SophiaCallback(hessian_interval=2, logits_fn=ex.logits_and_labels)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=2, callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(PlLM(), DataLoader(ex.counting_data(32), batch_size=8))
    assert trainer.global_step == 2 and trainer.optimizers[0].hessian_updates == 1
    assert [s for s, _ in callback.refreshes] == [2]


def test_the_default_logits_fn_on_an_inputs_labels_batch_says_what_to_pass(tmp_path):
    L.seed_everything(0, verbose=False)
    trainer = ex.make_trainer(str(tmp_path), callback=SophiaCallback(hessian_interval=1), max_epochs=1)
    data = DataLoader(ex.counting_data(16), batch_size=8, shuffle=False)
    with pytest.raises(TypeError, match=r"default logits_fn calls pl_module\(batch\).*batch of 2 items"
                                        r".*logits_fn=lambda module, batch"):
        trainer.fit(ex.TinyLM(), data)


def test_the_callback_takes_the_optimizers_interval_when_given_none(tmp_path):
    L.seed_everything(0, verbose=False)

    class Every3(ex.TinyLM):
        def configure_optimizers(self):
            config = super().configure_optimizers()
            opt = config["optimizer"] if isinstance(config, dict) else config
            for group in opt.param_groups:
                group["hessian_interval"] = 3
            return config

    callback = SophiaCallback(logits_fn=ex.logits_and_labels)
    trainer = ex.make_trainer(str(tmp_path), callback=callback, max_epochs=1)
    trainer.fit(Every3(), DataLoader(ex.counting_data(56), batch_size=8, shuffle=False))
    assert trainer.global_step == 7 and [s for s, _ in callback.refreshes] == [3, 6]
    assert callback.hessian_interval == 3
