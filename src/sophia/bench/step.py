"""``sophia bench step``: the cost of one optimizer step, side by side in one process.

Every variant owns a copy of the same parameter set (shapes of a GPT-like model) with
gradients and a non-trivial state; rounds time one step of each variant in a shuffled order,
so machine noise hits all of them alike; medians after warm-up. Ratios are to torch
AdamW(fused=True). The floor of a variant is the bytes it must move per step (read and
write of every tensor stream) over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sophia.bench.machine import check_out_dir, machine_info, resolve_device
from sophia.bench.machine import synchronize as _sync
from sophia.fileio import atomic_write_json, atomic_write_text
from sophia.optim import SophiaG, SophiaH


def gpt_like_shapes(n_layer: int, d: int, vocab: int, block: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style decoder with tied embeddings."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (block, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


PRESETS = {
    "30m": dict(n_layer=8, d=512, vocab=8192, block=1024),     # ~30M parameters
    "gpt2-small": dict(n_layer=12, d=768, vocab=50304, block=1024),  # ~124M
    "quick": dict(n_layer=2, d=128, vocab=1024, block=128),    # ~0.6M, for tests
}

# Tensor streams each variant reads or writes per parameter element per step.
STREAMS = {"sophiag": 6, "sophiah": 6, "adamw": 7, "lion": 5,
           # Muon on the matrices: read p, g, buf; write p, buf (its Newton-Schulz iteration is compute-bound,
           # so its time over this floor says little about memory traffic)
           "muon": 5,
           # pytorch-optimizer's SophiaH re-averages its last estimate into the EMA on every step:
           # read p, g, m, h_ema, h; write p, m, h_ema
           "po-sophiah": 8}


@dataclass
class Variant:
    name: str
    family: str
    step: Callable[[], None]
    bytes_per_step: int
    state_bytes_per_param: float


def _make_params(shapes, dtype, grads, device):
    g = torch.Generator().manual_seed(0)
    params = []
    for s, grad in zip(shapes, grads):
        p = torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
        p.grad = grad  # read-only for every optimizer: one copy shared by all variants
        params.append(p)
    return params


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (scalars such as a step count excluded)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0)


def _variants(shapes, dtype, include_compiled: bool, device: torch.device) -> list[Variant]:
    n = sum(torch.Size(s).numel() for s in shapes)
    elem = torch.empty((), dtype=dtype).element_size()
    out: list[Variant] = []
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]

    def add(name, family, opt_factory, step_fn=None, prime=None):
        params = _make_params(shapes, dtype, grads, device)
        opt = opt_factory(params)
        if isinstance(opt, (SophiaG, SophiaH)):
            opt.step()  # create state, then give it a realistic Hessian EMA
            opt.update_hessian(bs=1000)
        if prime is not None:
            prime(opt, params)
        fn = step_fn(opt) if step_fn else opt.step
        fn()  # every optimizer's state exists before its memory is counted
        out.append(Variant(name, family, fn, STREAMS[family] * n * elem, _state_bytes(opt) / n))

    add("SophiaG for-loop", "sophiag", lambda ps: SophiaG(ps, lr=1e-4, foreach=False))
    add("SophiaG foreach", "sophiag", lambda ps: SophiaG(ps, lr=1e-4, foreach=True))
    if include_compiled:
        add("SophiaG fused (compiled)", "sophiag", lambda ps: SophiaG(ps, lr=1e-4, fused=True))
    from sophia.optim import cpu_kernel

    if device.type == "cpu" and cpu_kernel.available():  # SophiaG's default on CPU where it builds
        add("SophiaG C++ kernel (default)", "sophiag", lambda ps: SophiaG(ps, lr=1e-4))
    if include_compiled and device.type == "cuda":
        add("SophiaG compiled + CUDA graph", "sophiag", lambda ps: SophiaG(ps, lr=1e-4, cuda_graph=True))
    from sophia.optim import triton_kernel

    if device.type == "cuda" and triton_kernel.available():  # the opt-in Triton multi-tensor kernel
        add("SophiaG Triton kernel (fused='triton')", "sophiag", lambda ps: SophiaG(ps, lr=1e-4, fused="triton"))
    add("SophiaH step (no refresh)", "sophiah",
        lambda ps: SophiaH(ps, lr=1e-4, hessian_interval=10 ** 9))
    add("AdamW for-loop", "adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=False))
    add("AdamW foreach", "adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True))
    add("AdamW fused", "adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True))
    try:
        import sophia_opt

        add("authors' SophiaG (sophia-opt)", "sophiag",
            lambda ps: sophia_opt.SophiaG(ps, lr=1e-4),
            step_fn=lambda opt: (lambda: opt.step(bs=5120)))
    except ImportError:
        pass
    if hasattr(torch.optim, "Muon"):
        from sophia.lm.optimizers import OptimizerSettings, build_optimizer

        def muon(ps):  # the harness's Muon: torch's on the 2-D matrices (in GPT order), AdamW on the rest
            groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
                      {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
            return build_optimizer("muon", groups, OptimizerSettings(lr=1e-4, weight_decay=0.1, beta1=0.9,
                                                                     beta2=0.95, muon_lr=0.02))

        add("Muon + AdamW (torch, as in sophia train)", "muon", muon)
    try:
        from pytorch_optimizer import Lion

        add("Lion (pytorch-optimizer)", "lion", lambda ps: Lion(ps, lr=1e-4))
    except ImportError:
        pass
    try:
        from pytorch_optimizer import SophiaH as POSophiaH

        # Its refresh differentiates the gradient; hand it one estimate instead, then time plain steps.
        add("SophiaH (pytorch-optimizer)", "po-sophiah",
            lambda ps: POSophiaH(ps, lr=1e-4, update_period=10 ** 9),
            prime=lambda opt, ps: opt.step(hessian=[torch.rand_like(p) for p in ps]))
    except ImportError:
        pass
    return out


def stream_bandwidth(n_bytes: int = 1 << 28, repeats: int = 5, device: torch.device | None = None) -> float:
    """Best bytes per second of an in-place ``a += b`` over large tensors (3 streams).

    Optimizer steps are in-place updates too, so this is the matching probe: read a, read b,
    write a, with no write-allocate traffic.
    """
    device = device or torch.device("cpu")
    a = torch.ones(n_bytes // 4, device=device)
    b = torch.ones(n_bytes // 4, device=device)
    a.add_(b)
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a.add_(b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 3 * n_bytes / best


def run(preset: str = "30m", dtype: str = "float32", rounds: int = 15, warmup: int = 3,
        include_compiled: bool = True, seed: int = 0, device: str = "cpu") -> dict:
    if rounds < 2:
        raise ValueError(f"rounds must be >= 2 for medians and interquartile ranges, got {rounds}")
    shapes = gpt_like_shapes(**PRESETS[preset])
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    dev = resolve_device(device)
    variants = _variants(shapes, torch_dtype, include_compiled, dev)
    for v in variants:  # compile, allocate, fault pages in
        v.step()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    bandwidths = []
    rng = random.Random(seed)
    for r in range(warmup + rounds):
        order = variants[:]
        rng.shuffle(order)
        for v in order:
            _sync(dev)
            t = time.perf_counter()
            v.step()
            _sync(dev)
            dt = time.perf_counter() - t
            if r >= warmup:
                times[v.name].append(dt)
        if r >= warmup and r % 3 == 0:
            bandwidths.append(stream_bandwidth(repeats=3, device=dev))
    bandwidth = max(bandwidths) if bandwidths else stream_bandwidth(device=dev)
    ref = statistics.median(times["AdamW fused"])
    rows = []
    for v in variants:
        med = statistics.median(times[v.name])
        floor = v.bytes_per_step / bandwidth
        rows.append({"variant": v.name, "median_ms": med * 1e3,
                     "iqr_ms": (statistics.quantiles(times[v.name], n=4)[2]
                                - statistics.quantiles(times[v.name], n=4)[0]) * 1e3,
                     "ratio_to_adamw_fused": med / ref, "floor_ms": floor * 1e3,
                     "times_floor": med / floor, "bytes_per_step": v.bytes_per_step,
                     "state_bytes_per_param": v.state_bytes_per_param})
    n = sum(torch.Size(s).numel() for s in shapes)
    machine = machine_info()
    return {"preset": preset, "dtype": dtype, "device": str(dev), "parameters": n, "tensors": len(shapes),
            "rounds": rounds, "warmup": warmup, "stream_bandwidth_GBps": bandwidth / 1e9,
            "machine": machine, "rows": rows}


def _machine_line(result: dict) -> str:
    m = result["machine"]
    where = (f"{m['gpu']} (host {m['cpu']})" if result.get("device", "cpu").startswith("cuda")
             else f"{m['cpu']}, {m['cores']} cores")
    return f"Machine: {where}, torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}."


def report(result: dict, command: str) -> str:
    lines = [
        f"# Optimizer step cost: {result['preset']} ({result['parameters'] / 1e6:.1f}M parameters in "
        f"{result['tensors']} tensors, {result['dtype']}, {result.get('device', 'cpu')})", "",
        f"Command: `{command}`", "",
        _machine_line(result) + " Memory bandwidth measured in the same run (best in-place "
        f"`a += b` over 256 MB tensors, 3 streams): {result['stream_bandwidth_GBps']:.1f} GB/s.", "",
        f"Medians over {result['rounds']} interleaved rounds after {result['warmup']} warm-up rounds.", "",
        "| variant | median ms | IQR ms | / AdamW fused | byte floor ms | x floor | state bytes/param |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | "
                     f"{r['ratio_to_adamw_fused']:.2f}x | {r['floor_ms']:.2f} | {r['times_floor']:.2f} | "
                     f"{r['state_bytes_per_param']:.1f} |")
    lines += ["", "Byte floor: streams per element (SophiaG/H 6: read p, g, m, h, write p, m; AdamW 7; "
              "Lion 5; pytorch-optimizer's SophiaH 8, since it folds its stored estimate into the EMA on every "
              "step; Muon 5, but its Newton-Schulz iteration is matrix multiplication, so its time is bound by "
              "compute, not this floor) x element size x parameters / measured bandwidth.",
              "State bytes per parameter: the optimizer's tensor state, measured (SophiaG/SophiaH: exp_avg and "
              "hessian; AdamW: exp_avg and exp_avg_sq; Lion: exp_avg; Muon: a momentum buffer on the matrices, "
              "AdamW's two on the rest; pytorch-optimizer's SophiaH also keeps its last estimate)."]
    return "\n".join(lines) + "\n"


OUTPUTS = ("report.md", "results.json")


def main(out_dir: str, preset: str, dtype: str, rounds: int, quick: bool, compiled: bool,
         command: str = "sophia bench step", device: str = "cpu", overwrite: bool = False) -> None:
    resolve_device(device)  # a device this machine lacks is refused before anything is created
    out = check_out_dir(out_dir, OUTPUTS, overwrite)
    if quick:
        preset, rounds = "quick", 5
    result = run(preset=preset, dtype=dtype, rounds=rounds, include_compiled=compiled, device=device)
    result["command"] = command
    text = report(result, command)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "report.md", text)
    print(text)
