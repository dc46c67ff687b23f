"""The memory estimate of `sophia train` against measured peaks (issue: GPU harness).

For each (preset, optimizer) at the authors' micro-batch (12 x 1024, bf16 autocast on CUDA), one
process per measurement: ``measure_peak_bytes`` (torch.cuda.max_memory_allocated above the memory
held before the model existed) against ``estimate`` without the CUDA-context overhead term (which the
allocator's count does not see). Writes memory.md and memory.json into the folder given.

    python benchmarks/gpu/harness_memory.py OUT_DIR [--device cpu --quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASES = [("gpt2-small", "adamw"), ("gpt2-small", "sophiag"), ("gpt2-medium", "adamw"), ("gpt2-medium", "sophiag")]


def one(preset: str, optimizer: str, device: str, quick: bool) -> dict:
    from sophia.lm.memory import GiB, estimate, measure_peak_bytes
    from sophia.lm.presets import get_preset

    p = get_preset(preset)
    shape = dict(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"], block_size=p["block_size"],
                 vocab=50304, batch_size=p["batch_size"])
    if quick:
        shape.update(n_layer=2, n_embd=128, n_head=4, block_size=128, vocab=4096, batch_size=4)
    bf16 = device == "cuda"
    measured = measure_peak_bytes(optimizer=optimizer, device=device, bf16=bf16, vocab_pad_multiple=1, **shape)
    est = estimate(optimizer=optimizer, bf16=bf16, cuda=False, **shape)
    return {"preset": preset, "optimizer": optimizer, "shape": shape, "bf16": bf16,
            "measured_gib": measured / GiB, "estimate_gib": est.total / GiB,
            "ratio": est.total / measured, "parts_gib": est.as_dict()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("PRESET", "OPTIMIZER"))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(*a.one, a.device, a.quick)))
        return
    rows = []
    for preset, optimizer in CASES:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        cmd = [sys.executable, __file__, a.out, "--device", a.device, "--one", preset, optimizer]
        proc = subprocess.run(cmd + (["--quick"] if a.quick else []), capture_output=True, text=True, env=env,
                              timeout=300)
        if proc.returncode != 0:
            rows.append({"preset": preset, "optimizer": optimizer, "error": proc.stderr.strip()[-500:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Memory estimate against measured peaks", "",
             f"Device {a.device}; micro-batch as in each preset (12 x 1024 for GPT-2), bf16 autocast on CUDA; "
             "two training steps with clip and optimizer step (and Sophia-G's refresh); measured = "
             "max_memory_allocated above the memory held before the model; estimate without the CUDA-context term.",
             "", "| preset | optimizer | measured GiB | estimate GiB | estimate / measured |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['optimizer']} | error: {r['error'][:80]} | | |")
        else:
            lines.append(f"| {r['preset']} | {r['optimizer']} | {r['measured_gib']:.2f} | {r['estimate_gib']:.2f} | "
                         f"{r['ratio']:.2f} |")
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
