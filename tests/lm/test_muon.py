"""--optimizer muon: torch's Muon on the GPT's hidden matrices, torch's AdamW on the rest, as one object.

The expectations are torch's own two optimizers set up by parameter name, the harness's schedule
(lr_at) times the Muon groups' scale, and a run that resumes from a mid-run checkpoint."""

from __future__ import annotations

import copy
import io
import math
import shutil
from pathlib import Path

import pytest
import torch

from sophia.cli import main
from sophia.lm.checkpoint import list_checkpoints
from sophia.lm.config import TrainError, resolve_config
from sophia.lm.metrics import read_metrics
from sophia.lm.model import GPT, GPTConfig
from sophia.lm.muon import MUON_MOMENTUM, Muon, MuonAdamW, newton_schulz
from sophia.lm.optimizers import OptimizerSettings, build_optimizer

LR, MUON_LR, WD = 4e-3, 0.03, 0.1
SETTINGS = OptimizerSettings(lr=LR, weight_decay=WD, beta1=0.9, beta2=0.95, muon_lr=MUON_LR)


def _model(bias: bool = True, qk_norm: bool = True) -> GPT:
    torch.manual_seed(0)
    # block_size == n_embd: the position embedding has a block matrix's shape (d x d), so shape alone cannot tell
    return GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, bias=bias, qk_norm=qk_norm))


def _hidden_names(model: GPT) -> set[str]:
    return {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}


def _loss_backward(model: GPT, seed: int) -> None:
    x = torch.randint(0, 11, (3, 16), generator=torch.Generator().manual_seed(seed))
    model(x, x.roll(-1, dims=1))[1].backward()


def _set_lr(opt, lr: float) -> None:  # what the training loop does each step
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"] if "lr_scale" in g else lr


@pytest.mark.parametrize("bias,qk_norm", [(True, True), (False, False)])
def test_every_block_matrix_goes_to_muon_and_nothing_else(bias, qk_norm):
    model = _model(bias, qk_norm)
    opt = build_optimizer("muon", model.param_groups(WD), SETTINGS)
    name_of = {id(p): n for n, p in model.named_parameters()}  # the tied lm_head.weight is listed as wte.weight
    muon = [name_of[id(p)] for g in opt.muon.param_groups for p in g["params"]]
    adamw = [name_of[id(p)] for g in opt.adamw.param_groups for p in g["params"]]
    assert sorted(muon) == sorted(_hidden_names(model)) and len(muon) == 4 * 2
    assert sorted(muon + adamw) == sorted(name_of.values())  # every parameter exactly once
    assert adamw.count("wte.weight") == 1 and model.lm_head.weight is model.wte.weight
    assert {"wte.weight", "wpe.weight", "ln_f.weight"} <= set(adamw)
    assert [g["weight_decay"] for g in opt.param_groups] == [WD, WD, 0.0]  # matrices; embeddings; vectors
    assert [g["lr"] for g in opt.param_groups] == [MUON_LR, LR, LR]
    assert opt.param_groups[0]["lr_scale"] == pytest.approx(MUON_LR / LR)


def test_another_layout_is_refused():
    model = _model()
    groups = model.param_groups(WD)
    groups[0]["params"] = groups[0]["params"][1:]  # no token embedding in front
    with pytest.raises(ValueError, match="wte, wpe, then qkv"):
        build_optimizer("muon", groups, SETTINGS)
    with pytest.raises(ValueError, match="GPT.param_groups"):
        build_optimizer("muon", [{"params": list(model.parameters())}], SETTINGS)


def _torch_pair(model: GPT):
    """torch's Muon and AdamW, set up by name: the independent expectation."""
    named = dict(model.named_parameters())
    hidden = [p for n, p in named.items() if n in _hidden_names(model)]
    embeddings = [named["wte.weight"], named["wpe.weight"]]
    vectors = [p for p in named.values() if p.dim() < 2]
    muon = torch.optim.Muon(hidden, lr=MUON_LR, weight_decay=WD, momentum=MUON_MOMENTUM, nesterov=True)
    adamw = torch.optim.AdamW([{"params": embeddings, "weight_decay": WD}, {"params": vectors, "weight_decay": 0.0}],
                              lr=LR, betas=(0.9, 0.95), weight_decay=WD)
    return muon, adamw


def test_steps_equal_torchs_muon_and_adamw_stepped_separately():
    a = _model()
    b = copy.deepcopy(a)
    opt = build_optimizer("muon", a.param_groups(WD), SETTINGS)  # Newton-Schulz in bfloat16, as torch's
    muon, adamw = _torch_pair(b)
    for step, scale in enumerate((0.5, 1.0, 0.25)):  # a schedule: the Muon groups follow it at their multiple
        _set_lr(opt, LR * scale)
        for g in muon.param_groups:
            g["lr"] = MUON_LR * scale
        for g in adamw.param_groups:
            g["lr"] = LR * scale
        _loss_backward(a, step)
        _loss_backward(b, step)
        opt.step()
        muon.step()
        adamw.step()
        opt.zero_grad()
        muon.zero_grad()
        adamw.zero_grad()
    before = _model()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, dict(before.named_parameters())[name]), name  # every parameter moved
    assert len(opt.state) == len(list(a.parameters()))
    assert all(set(s) == {"momentum_buffer"} for p, s in opt.state.items() if p.dim() == 2 and p in muon.state)


def test_state_dict_round_trip_then_both_copies_continue_identically():
    a = _model()
    opt_a = build_optimizer("muon", a.param_groups(WD), SETTINGS)
    for step in range(2):
        _set_lr(opt_a, LR * (step + 1) / 2)
        _loss_backward(a, step)
        opt_a.step()
        opt_a.zero_grad()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)  # through bytes, as a checkpoint does
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    n = len(list(a.parameters()))
    assert sorted(saved["state"]) == list(range(n))
    assert sorted(i for g in saved["param_groups"] for i in g["params"]) == list(range(n))
    assert "lr_scale" in saved["param_groups"][0] and "lr_scale" not in saved["param_groups"][1]

    b = copy.deepcopy(a)
    opt_b = build_optimizer("muon", b.param_groups(WD), OptimizerSettings(lr=1.0, weight_decay=WD, beta1=0.9,
                                                                          beta2=0.95, muon_lr=1.0))
    opt_b.load_state_dict(saved)  # the saved lrs and lr_scale win over the fresh ones
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_a.param_groups]
    for step in range(2, 5):
        for model, opt in ((a, opt_a), (b, opt_b)):
            _set_lr(opt, LR / step)
            _loss_backward(model, step)
            opt.step()
            opt.zero_grad()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_a_state_dict_of_another_shape_is_refused():
    opt = build_optimizer("muon", _model().param_groups(WD), SETTINGS)
    sd = opt.state_dict()
    sd["param_groups"] = sd["param_groups"][:2]
    with pytest.raises(ValueError, match="3"):
        opt.load_state_dict(sd)


def test_muon_lr_is_validated_and_every_preset_has_one():
    assert resolve_config("tiny", "muon").muon_lr == 0.04  # benchmarks/results/muon-tiny-grid
    assert resolve_config("gpt2-small", "muon").muon_lr == 0.02
    assert resolve_config("tiny", "adamw").muon_lr is None
    for bad in (0.0, -0.02, float("nan")):
        with pytest.raises(TrainError, match="--muon-lr"):
            resolve_config("tiny", "muon", {"muon_lr": bad})


# -- through the harness -------------------------------------------------------------------------------------
SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
         "--eval-batches", "2", "--warmup-steps", "3", "--log-every", "1", "--no-progress"]




def _args(corpus: Path, tmp: Path, out: str, steps: int, *extra: str) -> list[str]:
    return ["train", "--optimizer", "muon", "--max-steps", str(steps), "--out-dir", str(tmp / out),
            "--corpus", str(corpus), "--data-root", str(tmp / "data"), *SMALL, *extra]


def test_train_runs_muon_groups_at_the_schedule_times_their_scale(corpus, tmp_path, capsys):
    assert main(_args(corpus, tmp_path, "run", 3, "--lr", "4e-3", "--min-lr", "4e-4", "--muon-lr", "0.03")) == 0
    train = [e for e in read_metrics(tmp_path / "run") if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3] and all(e["train_loss"] > 0 for e in train)
    groups = torch.load(list_checkpoints(tmp_path / "run")[0], weights_only=True)["optimizer"]["param_groups"]
    lr = train[-1]["lr"]  # the schedule's value at the last step
    assert 0 < lr < 4e-3
    assert groups[0]["lr_scale"] == pytest.approx(0.03 / 4e-3)
    assert groups[0]["lr"] == pytest.approx(lr * 0.03 / 4e-3, rel=1e-12)
    assert [g["lr"] for g in groups[1:]] == [lr, lr]


def test_muon_lr_given_to_another_optimizer_is_said_to_do_nothing(corpus, tmp_path, capsys):
    args = _args(corpus, tmp_path, "adamw", 1, "--muon-lr", "0.05")
    args[args.index("muon")] = "adamw"
    assert main(args) == 0
    assert "--muon-lr has no effect with --optimizer adamw" in capsys.readouterr().err


def test_resume_from_a_mid_run_checkpoint_ends_bitwise_equal(corpus, tmp_path, capsys):
    """What a kill between checkpoints leaves: the step-3 checkpoint and metrics past it."""
    common = ("--checkpoint-every", "3", "--eval-every", "3", "--dropout", "0.1")
    assert main(_args(corpus, tmp_path, "run", 6, *common)) == 0
    final = list_checkpoints(tmp_path / "run")[0]
    ref = torch.load(final, weights_only=True)
    events_ref = read_metrics(tmp_path / "run")
    assert ref["step"] == 6
    shutil.move(final, tmp_path / "ref.pt")
    assert main(["train", "--out-dir", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    out = torch.load(list_checkpoints(tmp_path / "run")[0], weights_only=True)
    assert out["step"] == 6
    for k in ref["model"]:
        assert torch.equal(ref["model"][k], out["model"][k]), k
    sa, sb = ref["optimizer"]["state"], out["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert ref["optimizer"]["param_groups"] == out["optimizer"]["param_groups"]
    key = [(e["event"], e["step"], e.get("train_loss"), e.get("val_loss")) for e in events_ref]
    assert key == [(e["event"], e["step"], e.get("train_loss"), e.get("val_loss"))
                   for e in read_metrics(tmp_path / "run") if e["event"] != "resume"]


def _newton_schulz_float64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration written out in float64: X <- aX + b(XX^T)X + c(XX^T)^2 X, wide side first."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm()
    for _ in range(steps):
        s = x @ x.T
        x = a * x + b * s @ x + c * s @ s @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_newton_schulz_in_float32_is_close_to_float64_and_bfloat16_is_not(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    want = _newton_schulz_float64(g)
    f32 = newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    bf16 = newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.bfloat16)
    assert f32.dtype == torch.float32 and f32.shape == g.shape
    err32, err16 = (f32.double() - want).abs().max().item(), (bf16.double() - want).abs().max().item()
    assert err32 < 1e-4 < err16
    assert torch.equal(g, torch.randn(shape, generator=torch.Generator().manual_seed(1)))  # input untouched


def test_ns_dtype_is_passed_on_and_the_momentum_buffer_is_not_overwritten():
    w = torch.nn.Parameter(torch.randn(8, 4))
    b = torch.nn.Parameter(torch.zeros(8))
    opt = MuonAdamW([{"params": [w]}], [{"params": [b]}], lr=1e-3, muon_lr=0.02, weight_decay=0.0)
    assert opt.muon.ns_dtype == torch.bfloat16
    assert MuonAdamW([{"params": [w]}], [{"params": [b]}], lr=1e-3, muon_lr=0.02, weight_decay=0.0,
                     ns_dtype=torch.float32).muon.ns_dtype == torch.float32
    # without Nesterov the update is the buffer itself: the iteration must work on a copy
    plain = Muon([w], lr=0.02, weight_decay=0.0, nesterov=False, ns_dtype=torch.float32)
    w.grad = torch.randn(8, 4)
    before = w.detach().clone()
    plain.step()
    buf = plain.state[w]["momentum_buffer"]
    assert torch.allclose(buf, 0.05 * w.grad, rtol=0, atol=1e-7)
    want = before.double() - 0.02 * math.sqrt(2) * _newton_schulz_float64(buf)
    assert torch.allclose(w.detach().double(), want, atol=1e-5)
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([w], ns_dtype=torch.int32)


def test_cpu_bf16_support_is_read_from_the_cpu_flags(tmp_path):
    from sophia.lm.muon import cpu_has_native_bf16

    cases = {"avx2": ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n", False),
             "zen4": ("flags\t\t: fpu avx2 avx512f avx512_bf16\nflags\t\t: fpu\n", True),
             "sapphire": ("flags\t\t: avx512f amx_bf16 amx_tile\n", True),
             "arm": ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", True),
             "no-flags": ("processor\t: 0\nmodel name\t: something\n", None)}
    for name, (text, want) in cases.items():
        (tmp_path / name).write_text(text)
        assert cpu_has_native_bf16(str(tmp_path / name)) is want, name
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is None


def test_train_muon_ns_dtype_reaches_the_iteration_and_is_kept_on_resume(corpus, tmp_path, capsys):
    from sophia.lm.muon import cpu_has_native_bf16

    assert main(_args(corpus, tmp_path, "bf16", 1, "--checkpoint-every", "1")) == 0
    err = capsys.readouterr().err
    assert ("no native bfloat16 matmuls" in err) == (cpu_has_native_bf16() is False)
    assert main(_args(corpus, tmp_path, "fp32", 1, "--checkpoint-every", "1", "--muon-ns-dtype", "float32")) == 0
    assert "no native bfloat16 matmuls" not in capsys.readouterr().err
    a, b = (torch.load(list_checkpoints(tmp_path / r)[0], weights_only=True) for r in ("bf16", "fp32"))
    assert a["config"]["muon_ns_dtype"] == "bfloat16" and b["config"]["muon_ns_dtype"] == "float32"
    hidden = _hidden_names(GPT(GPTConfig(**a["model_config"])))
    # one step: the AdamW part saw the same gradients; Muon's matrices got iterations in different dtypes
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"] if k not in hidden)
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in hidden)
    assert main(["train", "--out-dir", str(tmp_path / "fp32"), "--resume", "--max-steps", "2", "--no-progress"]) == 0
    assert torch.load(list_checkpoints(tmp_path / "fp32")[0], weights_only=True)["config"]["muon_ns_dtype"] \
        == "float32"
    with pytest.raises(TrainError, match="--muon-ns-dtype must be bfloat16 or float32"):
        resolve_config("tiny", "muon", {"muon_ns_dtype": "float16"})
