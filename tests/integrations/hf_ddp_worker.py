"""One rank of test_transformers' DDP test: run by torchrun, writes what it ended with."""

from __future__ import annotations

import os
import sys

import torch

from sophia.lm.parallel import close_process_group


def main(out_dir: str) -> None:
    import hf_trainer_gpt2 as ex  # on PYTHONPATH (examples/)

    rank = int(os.environ["RANK"])
    batches = []

    def collate(features):
        batch = ex.collate(features)
        batches.append(batch["labels"].clone())
        return batch

    for sophia in ("sophiag", "sophiah"):
        batches.clear()
        trainer = ex.build_trainer(os.path.join(out_dir, sophia), sophia=sophia, max_steps=6, batch_size=4,
                                   accumulation=2, hessian_interval=2, logging_steps=2, n_examples=64,
                                   ddp_backend="gloo", ddp_find_unused_parameters=False)
        trainer.data_collator = collate
        trainer.train()
        opt = trainer.sophia_optimizer
        # each step's predictions on this rank: non-ignored shifted labels of its two micro-batches
        counts = [sum(int((y[:, 1:] != -100).sum()) for y in batches[2 * s: 2 * s + 2]) for s in range(6)]
        torch.save({"params": [p.detach().clone() for p in trainer.model.parameters()],
                    "hessian": [opt.state[p]["hessian"].clone() for p in trainer.model.parameters()],
                    "hessian_updates": opt.hessian_updates, "refreshes": trainer.hessian_refreshes,
                    "counts": counts}, os.path.join(out_dir, f"{sophia}-rank{rank}.pt"))
    # every rank gets here: the group is drained, then destroyed, before the rank exits (close_process_group
    # says why a rank exiting with gloo's threads still at work can abort)
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
