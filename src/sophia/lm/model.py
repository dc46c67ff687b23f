"""A GPT decoder like the paper's GPT-2 models: pre-LayerNorm blocks, GELU MLP, learned
positions, tied input and output embeddings, dropout.

Attention goes through ``scaled_dot_product_attention`` (``attention="sdpa"``) or an explicit
softmax(QK^T)V (``attention="math"``), which supports double backward; the fused CPU/GPU
kernels do not, so Hutchinson estimates need the math path (:meth:`GPT.use_attention`).

``qk_norm=True`` (off in every GPT-2 preset, which keep the paper's architecture) normalises
each head's query and key with an RMSNorm over the head dimension (a learnable gain per
dimension, shared by the heads) before the dot product: the remedy of Dehghani et al. 2023
and Wortsman et al. 2023 for attention logits that grow without bound. With unit gains a
logit is then at most sqrt(head_dim) in magnitude.

:meth:`GPT.attention_stats` measures, per layer, the largest attention logit (after the
1/sqrt(d) scaling, causal positions only) and the mean entropy of the attention rows.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sophia.hessian.gnb import sample_categorical_from_uniform

ATTENTION = ("sdpa", "math")


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    qk_norm: bool = False
    vocab_pad_multiple: int = 1  # embedding rows and head outputs padded to a multiple (64: aligned matmuls)

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_pad_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class HeadRMSNorm(nn.Module):
    """x / rms(x) * gain over the last dimension, written out in plain ops (double backward works)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attention = "sdpa"
        head_dim = cfg.n_embd // cfg.n_head
        self.q_norm = HeadRMSNorm(head_dim) if cfg.qk_norm else None
        self.k_norm = HeadRMSNorm(head_dim) if cfg.qk_norm else None

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def logits(self, x: Tensor) -> Tensor:
        """The attention logits (B, heads, T, T), scaled by 1/sqrt(d), -inf above the diagonal."""
        q, k, _ = self._qkv(x)
        T = x.shape[1]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return att.masked_fill(~mask, float("-inf"))

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self._qkv(x)
        p = self.dropout if self.training else 0.0
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
            y = F.dropout(att, p, self.training) @ v
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


def attention_logit_stats(logits: Tensor) -> tuple[float, float]:
    """(largest |logit| over the unmasked entries, mean entropy in nats of the softmax rows) of
    attention logits (..., T, T) in which masked entries are -inf."""
    logits = logits.float()
    finite = torch.isfinite(logits)
    max_abs = logits.abs().masked_fill(~finite, 0.0).amax().item()
    p = torch.softmax(logits, dim=-1)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), torch.zeros_like(p))
    entropy = -plogp.sum(-1).mean().item()
    return max_abs, entropy


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias), nn.Dropout(cfg.dropout))
        self.checkpointed = False  # activation checkpointing: see GPT.set_activation_checkpointing

    def _forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward(self, x: Tensor) -> Tensor:
        if self.checkpointed and torch.is_grad_enabled():
            # Inside the block's own forward, so that a wrapper around the block (FSDP2's hooks) sees one call.
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(idx, targets)`` returns (logits, mean loss or None).

    With ``vocab_pad_multiple > 1`` the embedding and output head have ``padded_vocab_size`` rows
    (GPT-2's 50257 becomes 50304, which tensor cores multiply faster) but the logits returned
    cover the real vocabulary only, so no padded id is ever scored, sampled or generated.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input and output embeddings
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scaled init of residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Keep only each block's input for the backward and recompute the rest there (about a third more
        compute, activations cut to one block's plus a residual stream per layer). Dropout masks are
        recomputed identically (the checkpoint restores the RNG state)."""
        for block in self.blocks:
            block.checkpointed = bool(enabled)

    @property
    def attention(self) -> str:
        return self.blocks[0].attn.attention if len(self.blocks) else "sdpa"

    def set_attention(self, kind: str) -> None:
        if kind not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {kind!r}")
        for block in self.blocks:
            block.attn.attention = kind

    @contextmanager
    def use_attention(self, kind: str):
        """Temporarily switch the attention path (``"math"`` for double backward)."""
        before = self.attention
        self.set_attention(kind)
        try:
            yield self
        finally:
            self.set_attention(before)

    @torch.no_grad()
    def attention_stats(self, idx: Tensor) -> dict[str, list[float]]:
        """Per layer, on the batch ``idx``: ``attn_max_logit`` (largest |logit|) and ``attn_entropy``
        (mean entropy of the attention rows, nats; log(t+1) for uniform attention at position t)."""
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        max_logit, entropy = [], []
        for block in self.blocks:
            m, e = attention_logit_stats(block.attn.logits(block.ln_1(x)))
            max_logit.append(m)
            entropy.append(e)
            x = block(x)
        return {"attn_max_logit": max_logit, "attn_entropy": entropy}

    def forward(self, idx: Tensor, targets: Tensor | None = None, *,
                sample_uniform: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``targets`` (B, T) gives the mean cross-entropy against them. ``sample_uniform`` (B, T), uniform
        numbers in [0, 1), gives instead the mean cross-entropy against labels drawn from the model's own
        softmax at those numbers (Sophia-G's sampled-label loss), computed in the same graph as the forward,
        so a compiled model never materialises a float32 copy of the logits outside it."""
        if targets is not None and sample_uniform is not None:
            raise ValueError("pass targets or sample_uniform, not both")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if self.config.padded_vocab_size != self.config.vocab_size:
            # Padded classes are not tokens: out of the loss, the sampled labels and generation alike.
            logits = logits[..., :self.config.vocab_size]
        loss = None
        if sample_uniform is not None:
            targets = sample_categorical_from_uniform(logits, sample_uniform)
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on tensors with dim >= 2 (matrices, embeddings) only."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :].float() / max(temperature, 1e-8)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1, None]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
