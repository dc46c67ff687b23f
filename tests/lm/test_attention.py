"""Attention diagnostics against hand-built attention, QK-norm, and flush-denormal hygiene."""

from __future__ import annotations

import math

import torch

from sophia.denormal import flush_denormal_enabled, flush_denormals
from sophia.hessian import hutchinson
from sophia.lm.model import GPT, GPTConfig, attention_logit_stats


def _causal(logits: torch.Tensor) -> torch.Tensor:
    T = logits.shape[-1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return logits.masked_fill(~mask, float("-inf"))


def test_stats_of_uniform_attention():
    T = 6
    max_logit, entropy = attention_logit_stats(_causal(torch.full((2, 3, T, T), 0.5)))
    assert max_logit == 0.5
    want = sum(math.log(t + 1) for t in range(T)) / T  # row t attends uniformly to t + 1 positions
    assert abs(entropy - want) < 1e-6


def test_stats_of_one_hot_attention_and_a_known_maximum():
    T = 5
    logits = torch.zeros(1, 1, T, T)
    logits[..., 0] = 1000.0  # every row puts (almost) all its weight on position 0
    logits[0, 0, 3, 2] = -2500.0
    max_logit, entropy = attention_logit_stats(_causal(logits))
    assert max_logit == 2500.0
    assert entropy < 1e-6
    # a masked position never counts, however large
    logits = torch.zeros(1, 1, T, T)
    logits[0, 0, 0, 4] = 1e6
    assert attention_logit_stats(_causal(logits))[0] == 0.0


def test_model_stats_equal_an_independent_computation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 32, (3, 8))
    stats = model.attention_stats(idx)
    # by hand: run the blocks, and in each recompute q, k from the weights
    x = model.wte(idx) + model.wpe(torch.arange(8))
    for layer, block in enumerate(model.blocks):
        h = block.ln_1(x)
        q, k, _ = (block.attn.qkv(h)).split(16, dim=2)
        q = q.view(3, 8, 2, 8).transpose(1, 2)
        k = k.view(3, 8, 2, 8).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)).double() / math.sqrt(8)
        causal = torch.ones(8, 8, dtype=torch.bool).tril()
        assert abs(att[..., causal].abs().max().item() - stats["attn_max_logit"][layer]) < 1e-4
        p = torch.softmax(att.masked_fill(~causal, float("-inf")), -1)
        ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean().item()
        assert abs(ent - stats["attn_entropy"][layer]) < 1e-4
        x = block(x)


def test_qk_norm_bounds_the_logits_and_keeps_gradients_and_double_backward():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, qk_norm=True)
    model = GPT(cfg)
    with torch.no_grad():  # make q and k huge: without the norm the logits would be enormous
        for block in model.blocks:
            block.attn.qkv.weight.mul_(1000.0)
    idx = torch.randint(0, 32, (2, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 8, 32)
    stats = model.attention_stats(idx)
    assert max(stats["attn_max_logit"]) <= math.sqrt(8) * (1 + 1e-4)  # unit gains: |q.k|/sqrt(d) <= sqrt(d)
    loss.backward()
    for block in model.blocks:
        assert block.attn.q_norm.weight.grad is not None and block.attn.q_norm.weight.grad.abs().sum() > 0
        assert block.attn.k_norm.weight.grad.abs().sum() > 0
    # Sophia-H's Hutchinson estimate needs a double backward through the normalisation (math attention)
    params = list(model.parameters())
    with model.use_attention("math"):
        est = hutchinson(lambda ps: model(idx, idx)[1], params, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(e).all() for e in est)
    assert any(e.abs().sum() > 0 for e in est[-4:])


def test_qk_norm_is_off_by_default_and_sdpa_equals_math():
    torch.manual_seed(0)
    assert GPTConfig().qk_norm is False
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16, qk_norm=True)).double()
    idx = torch.randint(0, 32, (2, 8))
    a = model(idx)[0]
    with model.use_attention("math"):
        b = model(idx)[0]
    torch.testing.assert_close(a, b)


def test_flush_denormal_is_restored_after_a_block_and_a_run(tmp_path):
    assert flush_denormal_enabled() is False
    with flush_denormals(True) as on:
        assert on is True and flush_denormal_enabled() is True
        assert (torch.tensor([1e-39]) * torch.tensor([1.0])).item() == 0.0
    assert flush_denormal_enabled() is False
    torch.set_flush_denormal(True)  # a caller who had it on keeps it on
    try:
        with flush_denormals(False):
            assert flush_denormal_enabled() is False
        assert flush_denormal_enabled() is True
    finally:
        torch.set_flush_denormal(False)
    # through a real training run: on during it (the default), off again afterwards
    from sophia.lm.config import resolve_config
    from sophia.lm.train import Trainer

    text = tmp_path / "t.txt"
    text.write_text("to be or not to be " * 500)
    cfg = resolve_config("tiny", "adamw", {"max_steps": 2, "corpus": str(text), "data_root": str(tmp_path / "d"),
                                           "n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16,
                                           "batch_size": 2, "eval_batches": 1, "progress": False})
    cfg.out_dir = str(tmp_path / "run")
    seen = []

    class Probe(Trainer):
        def train_step(self, i):
            seen.append(flush_denormal_enabled())
            return super().train_step(i)

    Probe(cfg, log=lambda m: None).run()
    assert seen == [True, True]
    assert flush_denormal_enabled() is False


def test_flush_denormals_never_leaks_into_torchs_thread_pool():
    import subprocess
    import sys

    code = """
import torch
from sophia.denormal import flush_denormals
torch.set_num_threads(2)
x = torch.full((1 << 22,), 1e-39)
with flush_denormals(True):
    inside = (x * 1.0 == 0).float().mean().item()
after = (x * 1.0 == 0).float().mean().item()
print(inside, after)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    inside, after = (float(v) for v in out.stdout.split())
    assert inside > 0.0  # the calling thread's share flushed
    assert after == 0.0  # and nothing flushes once the block is left
