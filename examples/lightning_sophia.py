"""Train a tiny next-token model with SophiaG and SophiaCallback in PyTorch Lightning.

The model (embedding, GRU, linear head) is built in code and the data are synthetic: each
sequence counts up from a random token with a random stride, modulo the vocabulary, with
different lengths padded to the longest; padded positions get the label -100, which both the
training loss and the Hessian refresh leave out.

    python examples/lightning_sophia.py                     # about a minute on a laptop CPU
    python examples/lightning_sophia.py --quick             # a few seconds: the test's form
    torchrun --nproc_per_node 2 examples/lightning_sophia.py --quick --devices 2   # DDP, gloo on CPU

Needs ``pip install "sophia-lab[lightning]"``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sophia import SophiaG
from sophia.integrations.lightning import SophiaCallback

VOCAB = 32
PAD = 0


def counting_data(n: int, max_len: int = 20, seed: int = 0) -> TensorDataset:
    """(inputs, labels) pairs: labels are the next tokens, -100 past each sequence's end."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.full((n, max_len), PAD, dtype=torch.long)
    labels = torch.full((n, max_len), -100, dtype=torch.long)
    for row in range(n):
        length = int(torch.randint(6, max_len + 2, (), generator=g))
        start = int(torch.randint(1, VOCAB, (), generator=g))
        stride = int(torch.randint(1, 4, (), generator=g))
        seq = torch.tensor([1 + (start - 1 + i * stride) % (VOCAB - 1) for i in range(length)])
        inputs[row, :length - 1] = seq[:-1][:max_len]
        labels[row, :length - 1] = seq[1:][:max_len]
    return TensorDataset(inputs, labels)


class TinyLM(L.LightningModule):
    """Embedding, one GRU layer, a linear head; SophiaG with decay on matrices only."""

    def __init__(self, lr: float = 3e-3, rho: float = 0.05, weight_decay: float = 0.1, warmup: int = 5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, 32)
        self.rnn = nn.GRU(32, 64, batch_first=True)
        self.head = nn.Linear(64, VOCAB)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(inputs))[0])

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        loss = F.cross_entropy(self(inputs).flatten(0, 1), labels.flatten(), ignore_index=-100)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        opt = SophiaG([{"params": decay, "weight_decay": self.hparams.weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr, rho=self.hparams.rho)
        warmup = self.hparams.warmup
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def logits_and_labels(pl_module: TinyLM, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """What SophiaCallback samples from: the logits, and labels marking the real predictions."""
    inputs, labels = batch
    return pl_module(inputs), labels


def make_trainer(root: str, *, callback: SophiaCallback, accumulate: int = 1, max_epochs: int = 3,
                 devices: int = 1, extra_callbacks: Sequence[L.Callback] = (), **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=root, accelerator="cpu", devices=devices,
                     strategy="ddp" if devices > 1 else "auto", max_epochs=max_epochs,
                     accumulate_grad_batches=accumulate, gradient_clip_val=1.0, log_every_n_steps=1,
                     callbacks=[callback, *extra_callbacks], logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=bool(extra_callbacks), **kwargs)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 short epochs, k=2: a few seconds")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP over gloo when > 1)")
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--hessian-interval", type=int, default=None)
    parser.add_argument("--report", default=None, help="write losses and refreshes here as JSON (rank 0)")
    a = parser.parse_args(argv)
    L.seed_everything(0, verbose=False)
    n, epochs, k = (64, 3, 2) if a.quick else (1024, 5, 10)
    data = DataLoader(counting_data(n), batch_size=8, shuffle=False)
    model = TinyLM()
    callback = SophiaCallback(hessian_interval=a.hessian_interval or k, logits_fn=logits_and_labels)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)  # Lightning divides it

    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tmp, callback=callback, accumulate=a.accumulate, max_epochs=epochs,
                               devices=a.devices)
        trainer.callbacks.append(Record())
        trainer.fit(model, data)
    opt = trainer.optimizers[0]
    result = {"steps": trainer.global_step, "losses": losses, "refreshes": callback.refreshes,
              **{key: float(value) for key, value in opt.diagnostics().items()}}
    if trainer.is_global_zero:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {trainer.global_step} optimizer steps; "
              f"{opt.hessian_updates} Hessian refreshes; win rate {result['win_rate']:.3f}")
        if a.report:
            with open(a.report, "w") as f:
                json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
