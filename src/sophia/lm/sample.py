"""``sophia sample``: text from a trained run's checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from sophia.lm.checkpoint import load_checkpoint
from sophia.lm.config import TrainError
from sophia.lm.model import GPT, GPTConfig


def sample(out_dir: str, *, start: str = "\n", max_new_tokens: int = 300, temperature: float = 0.8,
           top_k: int | None = 200, seed: int = 0, num_samples: int = 1) -> list[str]:
    from sophia.lm.data import DataError
    from sophia.lm.tokenizers import load_tokenizer

    if max_new_tokens < 1 or num_samples < 1 or temperature <= 0:
        raise TrainError("--max-new-tokens and --num-samples must be >= 1 and --temperature > 0")
    if top_k is not None and top_k < 0:
        raise TrainError(f"--top-k must be >= 0 (0: no top-k filtering), got {top_k}")
    top_k = top_k or None
    ckpt = load_checkpoint(Path(out_dir), purpose="sample")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    try:
        tok = load_tokenizer(Path(ckpt["dataset_dir"]))
    except DataError as e:
        raise TrainError(str(e)) from None
    ids = tok.encode(start) or [0]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_samples):
        idx = torch.tensor([ids], dtype=torch.long)
        y = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
        out.append(tok.decode(y[0].tolist()))
    return out
