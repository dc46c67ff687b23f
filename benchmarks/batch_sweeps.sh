#!/usr/bin/env bash
# The batch-regime sweeps: `tiny`, AdamW and SophiaG, 300 steps at 1,024 to 65,536 tokens per step, each batch
# size tuned on its own (3-point lr grid factor 2 apart, the edge rule; rho fixed at 0.05), then 3 fresh seeds.
# Every sweep evaluates on the same 512 validation windows (65,536 tokens): batch size x eval batches = 512, and
# the fixed validation batches are one random stream, so the windows are the same at every batch size.
# Each `sophia bench converge` continues its own folder where it stopped: running this again resumes the queue.
# Hours on 2 cores: run it in the background from a frozen copy of the code, e.g.
#   git worktree add -f --detach /work/sweep-batch HEAD
#   PYTHONPATH=/work/sweep-batch/src nohup setsid bash benchmarks/batch_sweeps.sh > /tmp/batch-sweeps.log 2>&1 &
# Commit each finished sweep's report.md, results.json and plots (and, while in progress, the finished runs'
# result.json with `git add -f`, so that a fresh checkout continues).
set -u
PY=${PYTHON:-.venv/bin/python}
R=benchmarks/results
sweep() {  # tokens per step, sequences per step, eval batches, AdamW grid, SophiaG grid
  $PY -m sophia bench converge --jobs 2 --data-root data --out-dir $R/converge-tiny-b$1 --steps 300 \
    --optimizers adamw,sophiag --batch-size $2 --eval-batches $3 --lrs adamw=$4 --lrs sophiag=$5 --rhos 0.05
  echo "== converge-tiny-b$1 -> $?"
}
sweep 1024 8 64 0.004,0.008,0.016 0.00025,0.0005,0.001
sweep 2048 16 32 0.004,0.008,0.016 0.00025,0.0005,0.001
sweep 4096 32 16 0.008,0.016,0.032 0.00025,0.0005,0.001
sweep 16384 128 4 0.008,0.016,0.032 0.0005,0.001,0.002
sweep 65536 512 1 0.008,0.016,0.032 0.0005,0.001,0.002
