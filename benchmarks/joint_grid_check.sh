#!/usr/bin/env bash
# Two points of the SophiaG lr x rho grid on `tiny` at 300 steps (issue: the verdict beyond 300 steps), run
# with the converge sweep's settings (benchmarks/results/converge-tiny/sweep.json) at seed 0, one thread each:
# lr 1e-3 with rho 0.05 (reported 2.445) and with rho 5 (reported within 2.445-2.511).
#   bash benchmarks/joint_grid_check.sh [OUT_DIR]   (default benchmarks/results/joint-grid-check; resumable)
set -eu
OUT=${1:-benchmarks/results/joint-grid-check}
SOPHIA=${SOPHIA:-.venv/bin/sophia}
mkdir -p "$OUT"
for rho in 0.05 5; do
  d="$OUT/runs/sophiag-lr0.001-rho$rho-s0"
  if [ -f "$d/done" ]; then continue; fi
  resume=(); ls "$d"/checkpoint-*.pt >/dev/null 2>&1 && resume=(--resume)
  OMP_NUM_THREADS=1 "$SOPHIA" train --preset tiny --optimizer sophiag --lr 0.001 --min-lr 0.0001 --rho "$rho" \
    --seed 0 --max-steps 300 --eval-every 25 --eval-batches 10 --checkpoint-every 75 --log-every 25 \
    --warmup-steps 100 --data-root data --no-progress --out-dir "$d" "${resume[@]}" > "$d.log" 2>&1
  touch "$d/done"
done
.venv/bin/python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for d in sorted((out / "runs").iterdir()):
    if not d.is_dir():
        continue
    ev = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    s = [e for e in ev if e["event"] == "summary"][-1]
    rows.append({"run": d.name, "final_val_loss": s.get("final_val_loss", s.get("val_loss")),
                 "win_rate": s.get("win_rate")})
(out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
print(json.dumps(rows, indent=2))
PY
