#!/usr/bin/env bash
# The GPU checks of the training harness, in one run of about 8 minutes on a lent GPU:
#   1. `sophia train` throughput (tokens/s and MFU after warm-up) for AdamW, SophiaG (whole and 1/4
#      Hessian batch) and SophiaH on gpt2-small, and each speed feature switched off once;
#   2. the memory estimate against torch.cuda.max_memory_allocated for gpt2-small and gpt2-medium;
#   3. the CUDA tests (tests/gpu; about 2 min, plus about 1 min for the converge sweep on the GPU).
# Prepare here with `bash benchmarks/gpu/prepare_devsite.sh` (the GPT-2- and byte-tokenized data and the
# pure-Python packages the GPU image lacks), then run from the repository root on the CUDA machine, carrying
# data/shakespeare-gpt2, data/shakespeare-byte and .devsite. ONLY=0,1,... picks throughput configurations (harness_throughput.py's
# CONFIGS, default all); SECTIONS=throughput,memory,tests picks the sections (default all, in that order), so
# that one call stays under the device's 10 minutes. Outputs go to $OUT (default gpu-out); commit them under
# benchmarks/results/gpu-h200/.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# .devsite: pure-Python packages the GPU image lacks (prepare_devsite.sh), carried along
export PYTHONPATH="$PWD/src:$PWD/.devsite${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
say() { echo "== $* ($(date -u +%T))" | tee -a "$LOG"; }

say environment
{ nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee -a "$LOG"
test -f data/shakespeare-gpt2/meta.json || { say "data/shakespeare-gpt2 missing: carry it"; exit 2; }

SECTIONS=${SECTIONS:-throughput,memory,tests}
want() { case ",$SECTIONS," in *",$1,"*) return 0;; *) return 1;; esac; }

if want throughput; then
say "throughput, gpt2-small"
timeout 400 $PY benchmarks/gpu/harness_throughput.py "$OUT" --preset gpt2-small --steps 40 --grad-accum 4 \
  --timeout 150 ${ONLY:+--only "$ONLY"} 2>&1 | tail -16 | tee -a "$LOG"

fi

if want memory; then
say "memory estimate against measured peaks"
timeout 110 $PY benchmarks/gpu/harness_memory.py "$OUT" 2>&1 | tail -8 | tee -a "$LOG"

fi

if want tests; then
say "CUDA tests"
timeout 330 $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -15 | tee "$OUT/tests.txt" | tee -a "$LOG"
fi
say done
