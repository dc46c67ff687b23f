#!/usr/bin/env bash
# The verdict sweeps of issues 12 and 13, one after another (each `sophia bench converge` continues its own
# folder where it stopped, so running this again resumes the whole queue). Hours on 2 cores: run it in the
# background, from a frozen copy of the code so that edits do not reach running sweeps, e.g.
#   git worktree add -f --detach /work/sweep-src HEAD
#   PYTHONPATH=/work/sweep-src/src nohup setsid bash benchmarks/verdict_sweeps.sh > sweeps.log 2>&1 &
# Commit each finished sweep's report.md, results.json and plots (and, while in progress, the finished
# runs' result.json with `git add -f`, so that a fresh checkout continues).
set -u
PY=${PYTHON:-.venv/bin/python}
R=benchmarks/results
converge() { $PY -m sophia bench converge --jobs 2 --data-root data "$@"; echo "== $* -> $?"; }
# tiny, 1000 steps: AdamW, SophiaG, Lion (started first), then Muon joins the same sweep
converge --out-dir $R/converge-tiny-1000 --steps 1000 --optimizers adamw,sophiag,lion,muon
# tiny, 1000 steps, QK-norm on both (issue 13)
converge --out-dir $R/converge-tiny-1000-qknorm --steps 1000 --optimizers adamw,sophiag --qk-norm
# small (3.5M parameters, BPE), 600 steps: AdamW, SophiaG, Muon (issue 12); Muon's Newton-Schulz iteration in float32:
# on an AVX2-only CPU torch's bfloat16 one took ~26 s per Muon step against ~6 s for SophiaG's (muon-ns-speed/)
converge --preset small --out-dir $R/converge-small-600 --steps 600 --optimizers adamw,sophiag,muon \
  --lrs adamw=0.002,0.004,0.008 --lrs sophiag=0.0005,0.001,0.002 --lrs muon=0.01,0.02,0.04 --rhos 0.05 --muon-ns-dtype float32
# small, 600 steps, QK-norm on both, from the best settings without it (AdamW 4e-3; SophiaG 5e-4, at the low edge
# of that grid at seed 0) and one step up; the edge rule extends either grid where its best sits (issue 13)
converge --preset small --out-dir $R/converge-small-600-qknorm --steps 600 --optimizers adamw,sophiag --qk-norm \
  --lrs adamw=0.004,0.008 --lrs sophiag=0.0005,0.001 --rhos 0.05
# tiny, 3000 steps: the 1000-step sweep's best lr and its neighbours; rho fixed at the chosen 0.05 (at 300
# steps rho moved the loss by <= 0.08 over a 100-fold range: joint-grid-check/)
converge --out-dir $R/converge-tiny-3000 --steps 3000 --optimizers adamw,sophiag \
  --lrs adamw=0.004,0.008,0.016 --lrs sophiag=0.0005,0.001,0.002 --rhos 0.05
