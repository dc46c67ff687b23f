"""Pre-train a tiny GPT-2 with Sophia inside the Hugging Face Trainer.

The model is built from a ``GPT2Config`` (nothing is downloaded) and the data are synthetic
sequences that a small model learns in a few hundred steps: each sequence counts up from a
random token with a random stride, modulo the vocabulary. Sequences have different lengths;
the collator pads them and gives the padding the label -100, which the Hessian refresh does
not count as predictions.

    python examples/hf_trainer_gpt2.py                 # about a minute on a laptop CPU
    python examples/hf_trainer_gpt2.py --quick         # a few seconds: the test's form
    torchrun --nproc_per_node 2 examples/hf_trainer_gpt2.py --quick   # DDP (gloo on CPU)

Needs ``pip install "sophia-lab[hf]"``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from sophia.integrations.transformers import SophiaTrainer

VOCAB = 64
PAD = 0


class CountingSequences(Dataset):
    """Sequences x_{i+1} = x_i + stride (mod VOCAB, skipping the pad id), lengths 8..max_len."""

    def __init__(self, n: int, max_len: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(8, max_len + 1, (), generator=g))
            start = int(torch.randint(1, VOCAB, (), generator=g))
            stride = int(torch.randint(1, 4, (), generator=g))
            ids = [1 + (start - 1 + i * stride) % (VOCAB - 1) for i in range(length)]
            self.items.append(torch.tensor(ids))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.items[i]}


def collate(features: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding gets attention 0 and label -100."""
    longest = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), longest), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
    for row, f in enumerate(features):
        input_ids[row, :len(f["input_ids"])] = f["input_ids"]
        attention_mask[row, :len(f["input_ids"])] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tiny_gpt2(seed: int = 0, *, attn_implementation: str = "sdpa") -> GPT2LMHeadModel:
    """A 2-layer GPT-2 with 32-wide embeddings, no dropout (so runs repeat exactly)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD,
                        bos_token_id=None, eos_token_id=None, loss_type="ForCausalLM")
    # sdpa (transformers' default) works for SophiaH too: SophiaTrainer runs its double backward on
    # the math kernel, the fused CPU/GPU kernels have none
    config._attn_implementation = attn_implementation
    return GPT2LMHeadModel(config)


def build_trainer(output_dir: str, *, max_steps: int = 300, batch_size: int = 8, accumulation: int = 1,
                  hessian_interval: int = 10, sophia: str = "sophiag", lr: float = 3e-3,
                  rho: float | None = 0.05, save_steps: int | None = None, logging_steps: int = 10,
                  n_examples: int = 512, seed: int = 0, **training_args) -> SophiaTrainer:
    args = TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=lr, weight_decay=0.1,
        warmup_steps=max(1, max_steps // 10), lr_scheduler_type="cosine", max_grad_norm=1.0,
        logging_steps=logging_steps, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, report_to=[], use_cpu=True, seed=seed, data_seed=seed,
        dataloader_num_workers=0, disable_tqdm=True, **training_args)
    return SophiaTrainer(model=tiny_gpt2(seed), args=args, train_dataset=CountingSequences(n_examples, seed=seed),
                         data_collator=collate, sophia=sophia, rho=rho, hessian_interval=hessian_interval)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 steps, k=5: a few seconds")
    parser.add_argument("--sophia", choices=["sophiag", "sophiah"], default="sophiag")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--hessian-interval", type=int, default=None)
    parser.add_argument("--output-dir", default=None, help="checkpoints go here (default: a temporary folder)")
    parser.add_argument("--report", default=None, help="write losses and refresh counts here as JSON")
    a = parser.parse_args(argv)
    max_steps = a.max_steps or (30 if a.quick else 300)
    k = a.hessian_interval or (5 if a.quick else 10)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(a.output_dir or tmp, max_steps=max_steps, accumulation=a.accumulation,
                                hessian_interval=k, sophia=a.sophia, logging_steps=5 if a.quick else 10)
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {"steps": trainer.state.global_step, "losses": [entry["loss"] for entry in logs],
              "win_rate": logs[-1]["win_rate"], "hessian_norm": logs[-1]["hessian_norm"],
              "hessian_updates": trainer.sophia_optimizer.hessian_updates,
              "refreshes": trainer.hessian_refreshes}
    if trainer.is_world_process_zero():
        print(f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f} in {result['steps']} steps; "
              f"{result['hessian_updates']} Hessian refreshes; win rate {result['win_rate']:.3f}")
        if a.report:
            with open(a.report, "w") as f:
                json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
