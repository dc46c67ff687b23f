"""CUDA paths: the optimizers against a float64 formula on the GPU, the estimators, the harness
with bf16 autocast. Skipped where no GPU is present (CI has none); run them on a GPU machine
with ``pytest tests/gpu`` (see benchmarks/gpu/check.sh)."""

from __future__ import annotations

import math

import pytest
import torch

from sophia import SophiaG, SophiaH
from sophia.hessian import categorical_sampled_loss, hutchinson

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OPTIMIZERS = [SophiaG, SophiaH]
IMPLS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "compiled": dict(fused=True),
         "cuda-graph": dict(cuda_graph=True), "default": {}, "triton": dict(fused="triton")}


def _formula(p, g, m, h, lr, b1, rho, wd, eps):
    m = b1 * m + (1 - b1) * g
    p = p * (1 - lr * wd) - lr * torch.clamp(m / torch.clamp(rho * h, min=eps), -1.0, 1.0)
    return p, m


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_float64_on_cuda_matches_formula_on_cpu(cls, impl):
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (3, 5, 7)]
    cpu = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    params = [c.cuda().requires_grad_(True) for c in cpu]
    lr, b1, b2, rho, wd, eps = 0.01, 0.9, 0.95, 0.05, 0.1, 1e-12
    extra = dict(hessian_interval=10 ** 6) if cls is SophiaH else {}
    opt = cls(params, lr=lr, betas=(b1, b2), rho=rho, weight_decay=wd, eps=eps, **extra, **IMPLS[impl])
    ref = [(c.clone(), torch.zeros_like(c), torch.zeros_like(c)) for c in cpu]
    for t in range(25):
        lr = 0.01 * (1 + 0.5 * math.sin(t))  # a scheduler: a new lr every step
        for group in opt.param_groups:
            group["lr"] = lr
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for p, g in zip(params, grads):
            if p.grad is None or t % 11 == 10:  # new gradient tensors now and then (they move)
                p.grad = g.cuda()
            else:
                p.grad.copy_(g)  # in place, as after zero_grad(set_to_none=False)
        opt.step()
        ref = [(*_formula(rp, g, rm, rh, lr, b1, rho, wd, eps), rh) for (rp, rm, rh), g in zip(ref, grads)]
        if t % 5 == 4:
            opt.update_hessian(bs=32)
            ref = [(rp, rm, b2 * rh + (1 - b2) * 32 * g ** 2) for (rp, rm, rh), g in zip(ref, grads)]
    for p, (rp, rm, rh) in zip(params, ref):
        torch.testing.assert_close(p.detach().cpu(), rp, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg"].cpu(), rm, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["hessian"].cpu(), rh, rtol=1e-10, atol=1e-12)
    if impl == "default":
        assert opt._implementation(opt.param_groups[0], params) == "foreach"
    if impl == "cuda-graph":  # the graph was used, and re-captured after the gradients moved
        graphed = next(iter(opt._graphs.values()))
        assert graphed.replays >= 15 and graphed.moves == 2


def test_float32_paths_agree_on_cuda():
    results = []
    for impl in ("for-loop", "foreach", "compiled", "cuda-graph", "triton"):
        gen = torch.Generator(device="cuda").manual_seed(3)
        params = [torch.randn(s, generator=gen, device="cuda").requires_grad_(True)
                  for s in [(256, 128), (128,), (1000,)]]
        opt = SophiaG(params, lr=1e-2, weight_decay=0.1, **IMPLS[impl])
        for t in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, device="cuda")
            opt.step()
            if t % 3 == 2:
                opt.update_hessian(bs=100)
        results.append([p.detach().cpu() for p in params])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_model_trained_with_the_triton_kernel_follows_the_loop_bitwise():
    # a real training loop (an MLP on a fixed task, fp32, refreshes from sampled-label-like estimates, gradients
    # re-created by backward every step, a new lr every step): the two paths' trajectories must be the same bits
    finals = []
    for impl in (dict(fused="triton"), dict(foreach=False)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                                    torch.nn.GELU(), torch.nn.Linear(256, 10)).cuda()
        opt = SophiaG(model.parameters(), lr=3e-3, weight_decay=0.1, hessian_interval=5, **impl)
        gen = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(512, 32, generator=gen, device="cuda")
        y = torch.randint(0, 10, (512,), generator=gen, device="cuda")
        for t in range(60):
            for group in opt.param_groups:
                group["lr"] = 3e-3 * (1 - t / 60)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if t % 5 == 4:  # GNB: labels sampled from the model, gradient of the mean loss
                logits = model(x)
                sampled = torch.distributions.Categorical(logits=logits.detach()).sample()
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(logits, sampled).backward()
                opt.update_hessian(bs=512)
        if impl.get("fused") == "triton":
            assert opt._implementation(opt.param_groups[0], list(model.parameters())) == "triton"
        finals.append(([p.detach().clone() for p in model.parameters()], float(loss)))
    (a, loss_a), (b, loss_b) = finals
    assert loss_a == loss_b
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


def test_cuda_graph_warns_once_when_gradients_keep_moving():
    p = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    opt = SophiaG([p], lr=1e-2, cuda_graph=True)
    with pytest.warns(RuntimeWarning, match="set_to_none=False"):
        for _ in range(6):
            p.grad = torch.randn(1000, device="cuda")  # a new tensor every step
            opt.step()
    assert next(iter(opt._graphs.values())).replays == 0


@pytest.mark.parametrize("impl", ["for-loop", "foreach", "compiled", "cuda-graph", "triton"])
def test_bf16_steps_follow_the_formula_on_cuda(impl):
    # bf16 trajectories of the paths drift apart by a few units in the last place (the loop rounds
    # after the decay and after the update, the compiled kernel once), so each step is checked against
    # the float64 formula applied to the bf16 values it started from.
    gen = torch.Generator(device="cuda").manual_seed(3)
    p = torch.randn(4096, generator=gen, device="cuda").to(torch.bfloat16).requires_grad_(True)
    lr, wd, b1, rho = 1e-2, 0.1, 0.965, 0.04
    opt = SophiaG([p], lr=lr, weight_decay=wd, rho=rho, **IMPLS[impl])
    for t in range(12):
        g = torch.randn(4096, generator=gen, device="cuda").to(torch.bfloat16)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)  # in place, so that the cuda-graph path replays its graph
        st = opt.state.get(p, {})
        m0 = st["exp_avg"].double() if st else torch.zeros(4096, dtype=torch.float64, device="cuda")
        h0 = st["hessian"].double() if st else torch.zeros(4096, dtype=torch.float64, device="cuda")
        ref_p, ref_m = _formula(p.detach().double(), p.grad.double(), m0, h0, lr, b1, rho, wd, 1e-15)
        opt.step()
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        torch.testing.assert_close(p.detach().double(), ref_p, rtol=2 ** -7, atol=lr * 2 ** -5)
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), ref_m, rtol=2 ** -7, atol=1e-3)
        if t % 4 == 3:
            opt.update_hessian(bs=10)


def test_hutchinson_is_exact_for_a_diagonal_quadratic_on_cuda():
    d = torch.linspace(0.1, 10.0, 50, device="cuda", dtype=torch.float64)
    x = torch.randn(50, device="cuda", dtype=torch.float64, requires_grad=True)
    for method in ("double_backward", "forward_over_reverse"):
        (est,) = hutchinson(lambda ps: 0.5 * (d * ps[0] ** 2).sum(), [x], method=method)
        torch.testing.assert_close(est, d)  # Rademacher probes: z * (D z) = D exactly


def test_sampled_labels_on_cuda_follow_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]], device="cuda").expand(200_000, 4).contiguous()
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits.requires_grad_(True)
    sampled = categorical_sampled_loss(logits, generator=gen)
    sampled.loss.backward()
    # d(mean CE)/d logits = (softmax - onehot(label)) / n: the column sums vanish in expectation
    probs = torch.softmax(logits.detach()[0].double(), 0)
    freq = probs.cpu() - logits.grad.sum(0).double().cpu()  # = the labels' empirical frequencies
    sd = (probs * (1 - probs) / 200_000).sqrt().cpu()
    assert ((freq - probs.cpu()).abs() < 5 * sd).all()
    assert sampled.n == 200_000


@pytest.mark.parametrize("optimizer,lr", [("adamw", None), ("sophiag", None), ("sophiah", None), ("lion", 1e-3),
                                          ("adahessian", None)])
def test_harness_trains_on_cuda_with_bf16_autocast(tmp_path, optimizer, lr):
    from sophia.lm.config import resolve_config
    from sophia.lm.train import Trainer

    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 2000)
    cfg = resolve_config("tiny", optimizer, {
        "corpus": str(corpus), "data_root": str(tmp_path / "data"), "n_layer": 2, "n_embd": 64, "n_head": 2,
        "block_size": 64, "batch_size": 16, "max_steps": 30, "warmup_steps": 5, "eval_every": 30,
        "eval_batches": 2, "hessian_interval": 5, "progress": False, "device": "cuda", "lr": lr,
        "min_lr": lr and lr / 10})
    cfg.out_dir = str(tmp_path / "run")
    trainer = Trainer(cfg)
    s = trainer.run()
    assert trainer.amp_dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    import json
    import math

    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["device"].startswith("cuda") and events[0]["config"]["dtype"] == "auto"
    first = next(e["val_loss"] for e in events if e["event"] == "eval")
    assert s["steps"] == 30 and math.isfinite(s["final_val_loss"])
    assert s["final_val_loss"] < first - 1.0  # it learns (the text is very repetitive)
    if optimizer in ("sophiag", "sophiah", "adahessian"):
        assert s["hessian_passes"] > 0
    if optimizer.startswith("sophia"):  # G refreshes after steps 5, 10, ..., 30; H before steps 6, 11, ..., 26
        assert s["hessian_updates"] == {"sophiag": 6, "sophiah": 5}[optimizer] and s["hessian_skipped"] == 0


def test_sampled_label_loss_in_a_compiled_forward_matches_eager_on_cuda():
    """Sophia-G's refresh in `sophia train` draws its labels inside the compiled forward (inverse CDF at given
    uniforms): the same loss and gradients as the eager model, float32."""
    from sophia.lm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=2, n_head=2, n_embd=64)).cuda()
    x = torch.randint(0, 1000, (8, 64), device="cuda")
    u = torch.rand(8, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    _, eager = model(x, sample_uniform=u)
    eager.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    _, compiled = torch.compile(model, fullgraph=True)(x, sample_uniform=u)  # no graph break in the sampler
    compiled.backward()
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-4)
    for g, w in zip((p.grad for p in model.parameters()), want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)


def test_fsdp_harness_on_one_cuda_rank_trains_and_resumes(tmp_path):
    """`sophia train --parallel fsdp` through real torchrun on the GPU (one rank, the preset's defaults for CUDA):
    Sophia-G learns, writes a DCP checkpoint, and continues from it."""
    import json
    import os
    import subprocess
    import sys

    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 2000)
    args = ["train", "--preset", "tiny", "--optimizer", "sophiag", "--parallel", "fsdp", "--device", "cuda",
            "--corpus", str(corpus), "--data-root", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"),
            "--n-layer", "2", "--n-embd", "64", "--n-head", "2", "--block-size", "64", "--batch-size", "16",
            "--warmup-steps", "5", "--eval-every", "20", "--eval-batches", "2", "--hessian-interval", "5",
            "--checkpoint-every", "20", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def torchrun(steps: int, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "sophia", *args, "--max-steps", str(steps), *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]

    torchrun(20)
    assert list((tmp_path / "run").glob("checkpoint-*.dcp")), "no DCP checkpoint written"
    torchrun(40, "--resume")
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e["val_loss"] for e in events if e["event"] == "eval"]
    summary = [e for e in events if e["event"] == "summary"][-1]
    assert summary["steps"] == 40 and summary["hessian_updates"] == 8 and math.isfinite(evals[-1])
    assert evals[-1] < evals[0] - 1.0


def test_converge_sweep_on_cuda_hands_each_run_the_gpu(tmp_path):
    """`sophia bench converge --device cuda --quick` through the real CLI: every run is a `sophia train` on the
    GPU it was handed (uncompiled, as --quick wants), and the report names the GPUs. Needs the prepared tiny corpus
    (carry data/shakespeare-byte; the machine has no network to prepare it)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not Path("data/shakespeare-byte/meta.json").exists():
        pytest.skip("data/shakespeare-byte is not prepared here (carry it to the GPU machine)")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "sophia", "bench", "converge", "--device", "cuda", "--quick", "--out-dir", str(out),
           "--optimizers", "adamw,sophiag", "--lrs", "adamw=0.004", "--lrs", "sophiag=0.001", "--rhos", "0.05",
           "--data-root", "data"]
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "results.json").read_text())
    assert result["spec"]["device"] == "cuda" and result["machine"]["gpus"] == torch.cuda.device_count()
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 6  # per optimizer: the one setting at seed 0, then 2 fresh seeds
    for run in runs:
        start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert start["device"].startswith("cuda") and start["config"]["compile"] is False
        assert math.isfinite(json.loads((run / "result.json").read_text())["final_val_loss"])
    assert "GPU" in (out / "report.md").read_text()
