"""One rank of test_lightning's DDP test: run by torchrun, writes what it ended with."""

from __future__ import annotations

import os
import sys
import tempfile
from collections import defaultdict

import torch

from sophia.lm.parallel import close_process_group


def main(out_dir: str) -> None:
    import lightning as L
    import lightning_sophia as ex  # on PYTHONPATH (examples/)
    from torch.utils.data import DataLoader

    from sophia.integrations.lightning import SophiaCallback

    counts: dict[int, int] = defaultdict(int)

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            counts[trainer.global_step + 1] += int((batch[1] != -100).sum())

    L.seed_everything(0, verbose=False)
    model = ex.TinyLM()
    callback = SophiaCallback(hessian_interval=2, logits_fn=ex.logits_and_labels)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ex.make_trainer(tmp, callback=callback, accumulate=2, max_epochs=2, devices=2)
        trainer.callbacks.append(Count())
        trainer.fit(model, DataLoader(ex.counting_data(48), batch_size=4, shuffle=False))
    opt = trainer.optimizers[0]
    params = list(model.parameters())
    torch.save({"params": [p.detach().clone() for p in params],
                "hessian": [opt.state[p]["hessian"].clone() for p in params],
                "hessian_updates": opt.hessian_updates, "steps": trainer.global_step,
                "refreshes": callback.refreshes, "counts": [counts[s] for s in range(1, trainer.global_step + 1)]},
               os.path.join(out_dir, f"rank{trainer.global_rank}.pt"))
    # every rank gets here: the group is drained, then destroyed, before the rank exits (close_process_group
    # says why a rank exiting with gloo's threads still at work can abort)
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
