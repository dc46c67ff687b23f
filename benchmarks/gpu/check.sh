#!/usr/bin/env bash
# The GPU checks of sophia-lab, in one run: the CUDA tests, `bench step` on the GPT-2-small
# parameter set (fp32 and bf16), `bench overhead` on the gpt2-small preset, and a short compiled
# gpt2-small training run with bf16 autocast. Run from the repository root on a CUDA machine with
# torch installed; the GPT-2-tokenized Shakespeare must be prepared in data/ (no network needed:
# `sophia data prepare shakespeare --tokenizer gpt2`). Writes its outputs into $OUT (default gpu-out).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
say() { echo "== $* ($(date -u +%T))" | tee -a "$LOG"; }

say environment
{ nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee -a "$LOG"

say "CUDA tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -25 | tee -a "$LOG"

for dtype in float32 bfloat16; do
  say "bench step gpt2-small $dtype"
  timeout 150 $PY -m sophia bench step --device cuda --preset gpt2-small --dtype $dtype --rounds 30 \
    --out-dir "$OUT/step-gpt2-small-$dtype" 2>&1 | tail -16 | tee -a "$LOG"
done

say "bench overhead gpt2-small"
timeout 200 $PY -m sophia bench overhead --device cuda --presets gpt2-small --corpus shakespeare \
  --tokenizer gpt2 --grad-accum 4 --steps 30 --out-dir /tmp/overhead 2>&1 | tail -12 | tee -a "$LOG"
mkdir -p "$OUT/overhead-gpt2-small" && cp /tmp/overhead/report.md /tmp/overhead/results.json "$OUT/overhead-gpt2-small/"

say "train gpt2-small, sophiag, compiled, bf16 autocast"
timeout 200 $PY -m sophia train --preset gpt2-small --optimizer sophiag --corpus shakespeare --tokenizer gpt2 \
  --grad-accum 4 --max-steps 40 --eval-every 20 --eval-batches 4 --compile --device cuda --no-progress \
  --out-dir /tmp/gpt2-small-sophiag 2>&1 | tail -12 | tee -a "$LOG"
say done
