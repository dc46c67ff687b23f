"""The GPT model, the optimizer registry (with checks of the third-party baselines), presets, config."""

from __future__ import annotations

import math

import pytest
import torch

from sophia.hessian import hutchinson
from sophia.lm.config import TrainError, resolve_config
from sophia.lm.model import GPT, GPTConfig
from sophia.lm.optimizers import OPTIMIZERS, OptimizerSettings, build_optimizer
from sophia.lm.presets import PRESETS
from sophia.lm.train import lr_at


def _tiny(dropout=0.0):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=8, dropout=dropout)).double()


def test_math_attention_equals_sdpa_and_supports_double_backward():
    model = _tiny()
    x = torch.randint(0, 11, (3, 16))
    logits_sdpa, loss_sdpa = model(x, x)
    with model.use_attention("math"):
        logits_math, loss_math = model(x, x)
        est = hutchinson(lambda ps: model(x, x)[1], list(model.parameters()))
    assert model.attention == "sdpa"
    torch.testing.assert_close(logits_sdpa, logits_math, rtol=1e-10, atol=1e-10)
    assert all(torch.isfinite(e).all() for e in est) and any(e.abs().sum() > 0 for e in est)


def test_causal_no_peeking_and_tied_embeddings():
    model = _tiny()
    x = torch.randint(0, 11, (1, 16))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 11
    a, _ = model(x)
    b, _ = model(y)
    torch.testing.assert_close(a[0, :10], b[0, :10])  # earlier positions do not see later tokens
    assert not torch.allclose(a[0, 10:], b[0, 10:])
    assert model.lm_head.weight is model.wte.weight


def test_weight_decay_only_on_matrices():
    model = _tiny()
    decay, no_decay = model.param_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("preset,millions", [("gpt2-small", 124), ("gpt2-medium", 355), ("gpt2-large", 774)])
def test_gpt2_presets_have_the_papers_sizes(preset, millions):
    p = PRESETS[preset]
    with torch.device("meta"):
        model = GPT(GPTConfig(block_size=p["block_size"], vocab_size=50257, n_layer=p["n_layer"],
                              n_head=p["n_head"], n_embd=p["n_embd"]))
    assert abs(model.num_parameters(non_embedding=False) / 1e6 - millions) / millions < 0.01


def test_gpt2_presets_carry_the_authors_settings():
    cfg = resolve_config("gpt2-medium", "sophiag")
    assert (cfg.lr, cfg.rho, cfg.weight_decay, cfg.min_lr) == (7e-4, 0.08, 0.2, 1e-5)
    assert (cfg.beta1, cfg.beta2, cfg.hessian_interval, cfg.warmup_steps) == (0.965, 0.99, 10, 2000)
    assert cfg.batch_size * cfg.grad_accum == 480 and cfg.block_size == 1024
    adam = resolve_config("gpt2-small", "adamw")
    assert (adam.lr, adam.min_lr, adam.weight_decay, adam.beta2) == (6e-4, 3e-5, 0.1, 0.95)


def test_gpt2_small_takes_a_step_at_a_tiny_batch():
    p = PRESETS["gpt2-small"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=p["n_layer"], n_head=p["n_head"],
                          n_embd=p["n_embd"]))
    cfg = resolve_config("gpt2-small", "sophiag")
    opt = build_optimizer("sophiag", model.param_groups(cfg.weight_decay),
                          OptimizerSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, beta1=cfg.beta1,
                                            beta2=cfg.beta2, rho=cfg.rho))
    x = torch.randint(0, 50257, (1, 32))
    _, loss = model(x, x)
    loss.backward()
    before = model.wte.weight.detach().clone()
    opt.step()
    assert math.isfinite(loss.item()) and not torch.equal(before, model.wte.weight)


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = resolve_config("tiny", "adamw", {"max_steps": 1000, "warmup_steps": 100, "lr": 1e-3, "min_lr": 1e-4})
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 101)
    assert lr_at(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(550, cfg) == pytest.approx(5.5e-4)
    assert lr_at(1000, cfg) == pytest.approx(1e-4) and lr_at(5000, cfg) == pytest.approx(1e-4)


@pytest.mark.parametrize("overrides,match", [
    ({"lr": -1.0}, "--lr"), ({"beta1": 1.0}, "--beta1"), ({"batch_size": 0}, "--batch-size"),
    ({"hessian_batch_fraction": 0.0}, "--hessian-batch-fraction"), ({"n_head": 3}, "divisible"),
    ({"min_lr": 1.0}, "--min-lr"), ({"dtype": "fp16"}, "--dtype"), ({"nonsense": 1}, "unknown setting"),
])
def test_bad_settings_are_one_clear_error(overrides, match):
    with pytest.raises(TrainError, match=match):
        resolve_config("tiny", "sophiag", overrides)


@pytest.mark.parametrize("preset,optimizer,match", [("huge", "adamw", "unknown preset"),
                                                    ("tiny", "adamax", "unknown optimizer")])
def test_unknown_preset_or_optimizer(preset, optimizer, match):
    with pytest.raises(TrainError, match=match):
        resolve_config(preset, optimizer)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_registered_optimizer_builds_and_steps(name):
    model = _tiny()
    cfg = resolve_config("tiny", name)
    opt = build_optimizer(name, model.param_groups(cfg.weight_decay),
                          OptimizerSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, beta1=cfg.beta1,
                                            beta2=cfg.beta2, rho=cfg.rho, hessian_interval=1))
    x = torch.randint(0, 11, (2, 16))
    with model.use_attention("math"):
        _, loss = model(x, x)
        loss.backward(create_graph=name in ("adahessian",))
    opt.step()  # for sophiah, step 1 is never a refresh step
    opt.zero_grad(set_to_none=True)
    _, after = model(x, x)
    assert math.isfinite(after.item())


def test_lion_matches_its_formula():
    from pytorch_optimizer import Lion

    torch.manual_seed(0)
    p = torch.randn(20, dtype=torch.float64, requires_grad=True)
    ref_p, ref_m = p.detach().clone(), torch.zeros(20, dtype=torch.float64)
    lr, wd, b1, b2 = 0.01, 0.5, 0.9, 0.99
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    for _ in range(10):
        g = torch.randn(20, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        ref_p = ref_p * (1 - lr * wd) - lr * torch.sign(b1 * ref_m + (1 - b1) * g)
        ref_m = b2 * ref_m + (1 - b2) * g
    torch.testing.assert_close(p.detach(), ref_p, rtol=1e-12, atol=1e-12)


def test_adahessian_hutchinson_is_unbiased_with_two_valued_probes():
    """A Rademacher draw stuck at -1 would give the row sums of H; the mean must be diag(H)."""
    from pytorch_optimizer import AdaHessian

    A = torch.tensor([[2.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 1.0]], dtype=torch.float64)
    torch.manual_seed(0)
    draws = []
    for _ in range(400):
        x = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
        opt = AdaHessian([x], lr=0.0, update_period=1)
        (0.5 * x @ A @ x).backward(create_graph=True)
        opt.step()
        draws.append(opt.state[x]["hessian"].clone())
    d = torch.stack(draws)
    assert d.std(0).min() > 0  # the probe varies
    off = (A * A).sum(1) - A.diagonal() ** 2  # per-coordinate variance of a Rademacher estimate
    assert ((d.mean(0) - A.diagonal()).abs() <= 5 * (off / len(d)).sqrt()).all(), d.mean(0)
