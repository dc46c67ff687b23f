"""Where does SophiaG's CUDA step time go? An exploration, not a product path.

Times, on the GPT-2-small parameter set (fp32 by default, CUDA), side by side and interleaved:
AdamW(fused=True); SophiaG foreach and compiled as shipped; the compiled body with inductor's
combo kernels (several tensors per kernel); the foreach and compiled bodies replayed from a
captured CUDA graph (no Python, no launch overhead); and the Triton multi-tensor kernel
(sophia.optim.triton_kernel, one launch for all tensors) at a few block sizes, plain and replayed
from a CUDA graph. Usage: python benchmarks/gpu/step_variants.py [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sophia.bench.step import PRESETS, gpt_like_shapes
from sophia.optim import SophiaG
from sophia.optim import functional as F
from sophia.optim import triton_kernel as TK


def main(rounds: int = 30, dtype: torch.dtype = torch.float32) -> None:
    dev = torch.device("cuda")
    shapes = gpt_like_shapes(**PRESETS["gpt2-small"])
    n = sum(torch.Size(s).numel() for s in shapes)

    def tensors():
        return [torch.randn(s, device=dev).to(dtype) for s in shapes]

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

    # the Triton multi-tensor kernel: one launch over all tensors; its block size and warps are not tuned yet
    hp = dict(lr=1e-4, beta1=0.965, rho=0.05, weight_decay=0.1, eps=1e-15, maximize=False)
    if TK.available():
        default = (TK.BLOCK, TK.NUM_WARPS)
        st_triton = state()
        for block, warps in ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8)):
            def step(block=block, warps=warps):
                TK.BLOCK, TK.NUM_WARPS = block, warps
                TK.sophia_step_(*st_triton, **hp)

            try:
                step()  # compiles, builds the tables
                variants[f"Triton kernel, BLOCK={block}, {warps} warps"] = step
            except Exception as e:
                print(f"Triton kernel {block}/{warps} failed: {type(e).__name__}: {str(e)[:300]}")
        TK.BLOCK, TK.NUM_WARPS = default
        try:
            variants["Triton kernel, CUDA graph"] = captured(lambda *a: TK.sophia_step_(*a, **hp), state())
        except Exception as e:
            print(f"Triton kernel, CUDA graph failed: {type(e).__name__}: {str(e)[:300]}")
        # one step against the for-loop path, on copies: the timings are of a correct kernel
        ps, gs, ms, hs = state()
        ps2, ms2 = [p.clone() for p in ps], [m.clone() for m in ms]
        TK.sophia_step_(ps, gs, ms, hs, **hp)
        F.sophia_update(ps2, gs, ms2, hs, implementation="for-loop", **hp)
        same = all(torch.equal(a, b) for a, b in zip(ps + ms, ps2 + ms2))
        worst = max(float((a.double() - b.double()).abs().max()) for a, b in zip(ps + ms, ps2 + ms2))
        print(f"Triton kernel vs for-loop path: {'bitwise equal' if same else f'max abs difference {worst:.3g}'}")
    else:
        print(f"Triton kernel not available: {TK.unavailable_reason() or 'no triton or no CUDA'}")

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
    floor = 6 * torch.empty((), dtype=dtype).element_size() * n / 4.1e12
    print(f"{n / 1e6:.1f}M {dtype} parameters in {len(shapes)} tensors, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}; SophiaG byte floor at 4.1 TB/s: {floor * 1e3:.2f} ms")
    print("| variant | median ms | / AdamW fused |\n|---|---:|---:|")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"| {k} | {med * 1e3:.2f} | {med / ref:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    main(args.rounds, getattr(torch, args.dtype))
