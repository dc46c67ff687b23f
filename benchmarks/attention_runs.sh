#!/usr/bin/env bash
# Attention over training on `tiny` (300 steps, the converge schedule: warm-up 100, cosine to lr/10), with and without QK-norm:
# AdamW at its tuned lr (0.016), SophiaG at its tuned setting (5e-4, rho 0.05) and at lr 4e-3 (where
# attention collapses without QK-norm). One thread per run, one run at a time; finished runs are kept.
# Usage: bash benchmarks/attention_runs.sh OUT_DIR
set -eu
OUT=${1:-benchmarks/results/attention-tiny}
mkdir -p "$OUT/runs"
for qk in no-qk-norm qk-norm; do
  for spec in "adamw 0.016" "sophiag 0.0005" "sophiag 0.004"; do
    set -- $spec
    d="$OUT/runs/$1-lr$2-$qk"
    if [ -f "$d/done" ]; then continue; fi
    rm -rf "$d"
    OMP_NUM_THREADS=1 python -m sophia train --preset tiny --optimizer "$1" --lr "$2" --min-lr "$(python -c "print($2/10)")" \
      --max-steps 300 --warmup-steps 100 --eval-every 25 --eval-batches 10 --log-every 25 --checkpoint-every 300 \
      --seed 1 --rho 0.05 --"$qk" --out-dir "$d" --no-progress > "$d.log" 2>&1 && touch "$d/done"
  done
done
