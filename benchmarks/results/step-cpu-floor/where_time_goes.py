"""Where the time of a SophiaG step goes on CPU: the step, its parts, and two ablations of the C++ kernel.

    python benchmarks/results/step-cpu-floor/where_time_goes.py OUT.md [ROUNDS]

All variants in one process, interleaved in a shuffled order each round, medians after warm-up (the threads
are torch's: set OMP_NUM_THREADS to change them). The ablations are the kernel's own source with one edit,
built under another operator namespace: "no division" multiplies where the clip divides; "6-stream copy"
keeps only the loads and stores (m = g + m, p = h). The floors are the bytes each moves over the best
in-place `a += b` bandwidth measured in the same run.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import sys
import time

import torch
from torch.utils.cpp_extension import load_inline

from sophia.bench.machine import machine_info
from sophia.bench.step import PRESETS, gpt_like_shapes
from sophia.optim import SophiaG, cpu_kernel
from sophia.optim import functional as F

BODY = """    const T mi = madd<FUSED>(w, gi - m0, SMALL ? m0 : gi);
    T d = static_cast<T>(h[i]) * rho;
    d = d < eps ? eps : d;  // max(rho * h, eps); nan stays nan, as in torch's clamp_min
    T r = mi / d;"""


def ablation(tag: str, body: str):
    source = cpu_kernel._SOURCE
    assert BODY in source, "the kernel's source changed: update BODY"
    source = source.replace(BODY, body).replace("TORCH_LIBRARY(sophia_lab", f"TORCH_LIBRARY(sophia_where_{tag}")
    name = f"sophia_where_{tag}_{hashlib.sha256(source.encode()).hexdigest()[:12]}"
    load_inline(name, [source], extra_cflags=cpu_kernel._CFLAGS, extra_ldflags=cpu_kernel._LDFLAGS,
                is_python_module=False, no_implicit_headers=True)
    return getattr(torch.ops, f"sophia_where_{tag}").sophia_step_


def main(out: str, rounds: int) -> None:
    assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    no_division = ablation("nodiv", BODY.replace("T r = mi / d;", "T r = mi * d;"))
    copy6 = ablation("copy", "    const T mi = gi + m0;\n    T r = static_cast<T>(h[i]);")
    shapes = gpt_like_shapes(**PRESETS["30m"])
    n = sum(torch.Size(s).numel() for s in shapes)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=gen) for s in shapes]

    def params():
        ps = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g
        return ps

    def sophia(**flags):
        opt = SophiaG(params(), lr=1e-4, **flags)
        opt.step()
        opt.update_hessian(bs=1000)
        return opt

    adamw = torch.optim.AdamW(params(), lr=1e-4, fused=True)
    kernel, compiled, raw = sophia(), sophia(fused=True), sophia()
    leaves = raw.param_groups[0]["params"]
    lists = ([p.detach() for p in leaves], [p.grad for p in leaves], [raw.state[p]["exp_avg"] for p in leaves],
             [raw.state[p]["hessian"] for p in leaves])
    settings = (1e-4, 0.035, 0.04, 1 - 1e-5, 1e-15, False)
    scalars = torch.tensor([1e-4, 0.035, 0.04, 1 - 1e-5, 1e-15]).unbind()
    aps, ams, avs = params(), [torch.randn(s, generator=gen) for s in shapes], \
        [torch.rand(s, generator=gen) for s in shapes]
    steps = [torch.tensor(5.0) for _ in shapes]
    a, b = torch.randn(n), torch.randn(n)

    def portable():
        cpu_kernel._set_variant("generic")
        try:
            torch.ops.sophia_lab.sophia_step_(*lists, *settings)
        finally:
            cpu_kernel._set_variant("best")

    variants = {  # name: (step, tensor streams it moves)
        "AdamW fused, optimizer step": (adamw.step, 7),
        "SophiaG default (C++ kernel), optimizer step": (kernel.step, 6),
        "SophiaG fused=True (compiled), optimizer step": (compiled.step, 6),
        "compiled graph alone (no optimizer Python)": (lambda: F._compiled_fn(*lists, *scalars, False), 6),
        "C++ kernel op alone": (lambda: torch.ops.sophia_lab.sophia_step_(*lists, *settings), 6),
        "C++ kernel op, portable variant (no AVX2/FMA)": (portable, 6),
        "C++ kernel op, no division (ablation)": (lambda: no_division(*lists, *settings), 6),
        "C++ kernel op, 6-stream copy, no arithmetic (ablation)": (lambda: copy6(*lists, *settings), 6),
        "torch._fused_adamw_ op alone": (lambda: torch._fused_adamw_(
            [p.detach() for p in aps], grads, ams, avs, [], steps, lr=1e-4, beta1=0.9, beta2=0.999,
            weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False), 7),
        "a.add_(b), 30M floats (bandwidth probe)": (lambda: a.add_(b), 3),
    }
    torch.set_grad_enabled(False)
    for fn, _ in variants.values():
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(0)
    for r in range(rounds + 3):
        order = list(variants)
        rng.shuffle(order)
        for k in order:
            t = time.perf_counter()
            variants[k][0]()
            if r >= 3:
                times[k].append(time.perf_counter() - t)
    bandwidth = 12 * n / min(times["a.add_(b), 30M floats (bandwidth probe)"])
    ref = statistics.median(times["AdamW fused, optimizer step"])
    m = machine_info()
    lines = [f"# Where the time of a SophiaG step goes: 30m preset ({n / 1e6:.1f}M fp32 parameters, "
             f"{len(shapes)} tensors), {torch.get_num_threads()} thread(s)", "",
             f"Command: `python benchmarks/results/step-cpu-floor/where_time_goes.py {out} {rounds}`"
             + (" with OMP_NUM_THREADS=1" if torch.get_num_threads() == 1 else ""), "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({torch.get_num_threads()} threads); "
             f"C++ kernel: {cpu_kernel.kernel_info()}. Best `a += b` bandwidth in this run: {bandwidth / 1e9:.1f} "
             f"GB/s. Medians (and minima) over {rounds} interleaved rounds after 3 warm-up rounds.", "",
             "| what | median ms | IQR ms | min ms | / AdamW fused step | x its byte floor (median) |",
             "|---|---:|---:|---:|---:|---:|"]
    for k, v in times.items():
        q = statistics.quantiles(v, n=4)
        med = statistics.median(v)
        floor = variants[k][1] * 4 * n / bandwidth
        lines.append(f"| {k} | {med * 1e3:.2f} | {(q[2] - q[0]) * 1e3:.2f} | {min(v) * 1e3:.2f} | "
                     f"{med / ref:.2f}x | {med / floor:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15)
