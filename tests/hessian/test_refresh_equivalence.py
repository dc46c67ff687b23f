"""The refresh as `sophia train`, `SophiaTrainer` and `SophiaCallback` run it: for one model (the harness's GPT,
behind a thin adapter for the integrations), the same micro-batches, seed and step, bitwise the same Hessian EMA."""

from __future__ import annotations

import os
import tempfile
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sophia import SophiaG
from sophia.hessian.refresh import (
    AllReduceSum,
    WrapperAverage,
    gnb_refresh_micro_batches,
    label_generator,
    sampled_categorical,
)
from sophia.lm.model import GPT, GPTConfig
from sophia.lm.train import in_forward_sampled_losses

SEED, STEP, VOCAB = 7, 30, 24


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16))


def _micro_batches(rank: int = 0, n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(0, VOCAB, (3, 8), generator=g) for _ in range(n)]


def _optimizer(model: nn.Module) -> SophiaG:
    return SophiaG(model.parameters(), lr=1e-3, betas=(0.9, 0.95), hessian_interval=1)


def _harness(xs: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    """As Trainer._gnb_refresh: labels drawn inside the model's forward, the DDP wrapper reducing."""
    gpt = _gpt()
    opt = _optimizer(gpt)
    model = nn.parallel.DistributedDataParallel(gpt) if world > 1 else gpt
    sync = (lambda last: nullcontext() if last else model.no_sync()) if world > 1 else None
    losses = in_forward_sampled_losses(model, [lambda x=x: x for x in xs],
                                       lambda micro: label_generator("cpu", SEED, STEP, rank, micro))
    gnb_refresh_micro_batches(opt, losses, reduction=WrapperAverage(sync) if world > 1 else None, max_grad_norm=1.0)
    return [opt.state[p]["hessian"].clone() for p in gpt.parameters()]


def _integrations_composition(xs: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """What SophiaTrainer and SophiaCallback compose under DDP: the unwrapped model's forward, sampled labels at
    the positions that count, an explicit all-reduce."""
    gpt = _gpt()
    opt = _optimizer(gpt)

    def one(micro, x):
        return lambda: sampled_categorical(gpt(x)[0], x, generator=label_generator("cpu", SEED, STEP, rank, micro))

    gnb_refresh_micro_batches(opt, [one(m, x) for m, x in enumerate(xs)], reduction=AllReduceSum(), max_grad_norm=1.0)
    return [opt.state[p]["hessian"].clone() for p in gpt.parameters()]


class _Causal(nn.Module):
    """The GPT as a transformers model would be called: logits for input_ids (labels aligned, not shifted)."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = _gpt()

    def forward(self, input_ids, labels=None):
        return {"logits": self.gpt(input_ids)[0]}


def _sophia_trainer(xs: list[torch.Tensor], tmp: str) -> list[torch.Tensor]:
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from sophia.integrations.transformers import SophiaTrainer

    model = _Causal()
    args = TrainingArguments(output_dir=tmp, seed=SEED, max_grad_norm=1.0, learning_rate=1e-3, adam_beta1=0.9,
                             report_to=[], use_cpu=True)
    trainer = SophiaTrainer(model=model, args=args, hessian_interval=1, betas=(0.9, 0.95))
    opt = trainer.create_optimizer()
    trainer.gnb_refresh([{"input_ids": x, "labels": x} for x in xs], STEP)
    return [opt.state[p]["hessian"].clone() for p in model.gpt.parameters()]


def _sophia_callback(xs: list[torch.Tensor], tmp: str) -> list[torch.Tensor]:
    L = pytest.importorskip("lightning")
    from sophia.integrations.lightning import SophiaCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.gpt = _gpt()

        def forward(self, x):
            return self.gpt(x)[0]

    module = Module()
    opt = _optimizer(module)
    trainer = L.Trainer(default_root_dir=tmp, accelerator="cpu", devices=1, gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.optimizers = [opt]
    callback = SophiaCallback(hessian_interval=1, logits_fn=lambda m, x: (m(x), x), seed=SEED)
    callback.refresh(trainer, module, xs, STEP)
    return [opt.state[p]["hessian"].clone() for p in module.gpt.parameters()]


def test_the_three_entry_points_fold_bitwise_the_same_estimate(tmp_path):
    torch.set_num_threads(1)
    xs = _micro_batches()
    ours = _harness(xs, rank=0, world=1)
    assert any(h.abs().sum() > 0 for h in ours)
    for name, got in {"SophiaTrainer": _sophia_trainer(xs, str(tmp_path / "hf")),
                      "SophiaCallback": _sophia_callback(xs, str(tmp_path / "pl"))}.items():
        for a, b in zip(ours, got):
            assert torch.equal(a, b), f"{name}'s refresh differs from sophia train's"


def _worker(rank, world, path, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        xs = _micro_batches(rank)
        result = {"harness": _harness(xs, rank, world), "integrations": _integrations_composition(xs, rank)}
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_the_wrappers_average_and_the_explicit_sum_fold_bitwise_the_same():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pt")
        mp.spawn(_worker, args=(2, os.path.join(d, "rendezvous"), out), nprocs=2)
        got = torch.load(out, weights_only=True)
    for a, b in zip(got["harness"], got["integrations"]):
        assert torch.equal(a, b)
    # and both are the refresh over all four micro-batches in one process (up to the order of the sums)
    gpt = _gpt()
    opt = _optimizer(gpt)
    xs = [(x, r, m) for r in range(2) for m, x in enumerate(_micro_batches(r))]
    losses = [lambda x=x, r=r, m=m: sampled_categorical(gpt(x)[0], x,
                                                        generator=label_generator("cpu", SEED, STEP, r, m))
              for x, r, m in xs]
    gnb_refresh_micro_batches(opt, losses, max_grad_norm=1.0)
    for a, p in zip(got["harness"], gpt.parameters()):
        torch.testing.assert_close(a, opt.state[p]["hessian"], rtol=1e-5, atol=1e-12)
