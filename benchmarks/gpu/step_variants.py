"""Where does SophiaG's CUDA step time go? An exploration, not a product path.

Times, on the GPT-2-small parameter set (fp32, CUDA), side by side and interleaved:
AdamW(fused=True); SophiaG foreach and compiled as shipped; the compiled body with inductor's
combo kernels (several tensors per kernel); and the foreach and compiled bodies replayed from a
captured CUDA graph (no Python, no launch overhead). Usage: python benchmarks/gpu/step_variants.py
"""

from __future__ import annotations

import statistics
import time

import torch

from sophia.bench.step import PRESETS, gpt_like_shapes
from sophia.optim import SophiaG
from sophia.optim import functional as F


def main(rounds: int = 30) -> None:
    dev = torch.device("cuda")
    shapes = gpt_like_shapes(**PRESETS["gpt2-small"])
    n = sum(torch.Size(s).numel() for s in shapes)

    def tensors():
        return [torch.randn(s, device=dev) for s in shapes]

    grads = tensors()

    def params():
        ps = [t.requires_grad_(True) for t in tensors()]
        for p, g in zip(ps, grads):
            p.grad = g
        return ps

    variants = {}
    pa = params()
    adamw = torch.optim.AdamW(pa, lr=1e-4, fused=True)
    variants["AdamW fused"] = adamw.step
    for name, kw in (("SophiaG foreach", dict(foreach=True)), ("SophiaG compiled", dict(fused=True))):
        ps = params()
        opt = SophiaG(ps, lr=1e-4, **kw)
        opt.step()
        opt.update_hessian(bs=1000)
        variants[name] = opt.step

    # bodies with fixed 0-d scalars on the device
    scal = torch.tensor([1e-4, 1 - 0.965, 0.05, 1 - 1e-4 * 0.1, 1e-15], device=dev).unbind()

    def state():
        ps = [p.detach() for p in params()]
        return ps, list(grads), [torch.randn_like(p) * 1e-3 for p in ps], [torch.rand_like(p) for p in ps]

    import torch._inductor.config as icfg

    try:
        torch._dynamo.reset()
        icfg.combo_kernels = True
        combo = torch.compile(F._compiled_body, fullgraph=True)
        st_combo = state()
        combo(*st_combo, *scal, False)
        variants["compiled body, combo kernels"] = lambda: combo(*st_combo, *scal, False)
    except Exception as e:  # an exploration: report and go on
        print(f"combo kernels failed: {type(e).__name__}: {str(e)[:300]}")
    finally:
        icfg.combo_kernels = False
        torch._dynamo.reset()

    def captured(body, st):
        for _ in range(3):  # warm up (and compile) outside the capture
            body(*st)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body(*st)
        return g.replay

    plain = torch.compile(F._compiled_body, fullgraph=True)
    for name, body in (("foreach body, CUDA graph", lambda *a: F._multi_tensor(*a, 1e-4, 0.965, 0.05, 0.1, 1e-15,
                                                                                False)),
                       ("compiled body, CUDA graph", lambda *a: plain(*a, *scal, False))):
        try:
            variants[name] = captured(body, state())
        except Exception as e:
            print(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")

    for v in variants.values():
        v()
    times = {k: [] for k in variants}
    import random

    rng = random.Random(0)
    for r in range(rounds + 3):
        order = list(variants.items())
        rng.shuffle(order)
        for k, v in order:
            torch.cuda.synchronize()
            t = time.perf_counter()
            v()
            torch.cuda.synchronize()
            if r >= 3:
                times[k].append(time.perf_counter() - t)
    ref = statistics.median(times["AdamW fused"])
    floor = 6 * 4 * n / 4.1e12
    print(f"{n / 1e6:.1f}M fp32 parameters in {len(shapes)} tensors, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}; SophiaG byte floor at 4.1 TB/s: {floor * 1e3:.2f} ms")
    print("| variant | median ms | / AdamW fused |\n|---|---:|---:|")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"| {k} | {med * 1e3:.2f} | {med / ref:.2f}x |")


if __name__ == "__main__":
    main()
