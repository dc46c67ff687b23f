#!/usr/bin/env bash
# The GPU checks of sophia-lab, in one run: the CUDA tests (with the Triton kernel's, compiled),
# `bench step` on the GPT-2-small parameter set (fp32 and bf16, with the opt-in Triton kernel's row), the
# step variants in bf16 (Triton block sizes, CUDA graph), `bench overhead` on the gpt2-small preset, and a short compiled
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
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/gpu tests/optim/test_triton_kernel.py 2>&1 | tail -25 | tee -a "$LOG"

for dtype in float32 bfloat16; do
  say "bench step gpt2-small $dtype"
  timeout 150 $PY -m sophia bench step --device cuda --preset gpt2-small --dtype $dtype --rounds 30 \
    --out-dir "$OUT/step-gpt2-small-$dtype" 2>&1 | tail -16 | tee -a "$LOG"
done

say "step variants gpt2-small bfloat16"
timeout 150 $PY benchmarks/gpu/step_variants.py --dtype bfloat16 --rounds 30 2>&1 | tail -20 | tee "$OUT/step-variants-bf16.md" | tee -a "$LOG"

say "bench overhead gpt2-small"
timeout 200 $PY -m sophia bench overhead --device cuda --presets gpt2-small --corpus shakespeare \
  --tokenizer gpt2 --grad-accum 4 --steps 30 --out-dir /tmp/overhead 2>&1 | tail -12 | tee -a "$LOG"
mkdir -p "$OUT/overhead-gpt2-small" && cp /tmp/overhead/report.md /tmp/overhead/results.json "$OUT/overhead-gpt2-small/"

say "train gpt2-small, sophiag, compiled, bf16 autocast"
timeout 200 $PY -m sophia train --preset gpt2-small --optimizer sophiag --corpus shakespeare --tokenizer gpt2 \
  --grad-accum 4 --max-steps 40 --eval-every 20 --eval-batches 4 --compile --device cuda --no-progress \
  --out-dir /tmp/gpt2-small-sophiag 2>&1 | tail -12 | tee -a "$LOG"
say done
