#!/usr/bin/env bash
# The small preset on the scenes world: 16-bit, 2-bit and 1-bit, the same recipe and
# seed, then held-out accuracy per family. Prints one table per run and the wall time
# of each training. STEPS (default the preset's 6000) and PER_FAMILY (default 200) scale it.
#   bash benchmarks/small_bits.sh                 # the preset's recipe: hours on 2 cores
#   STEPS=1500 bash benchmarks/small_bits.sh      # the shortened run the README reports
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/small-bits}
STEPS=${STEPS:-6000}
VISION_STEPS=${VISION_STEPS:-300}
PER_FAMILY=${PER_FAMILY:-200}
mkdir -p "$OUT"
for run in "fp16:--baseline" "2bit:--bits 2" "1bit:--bits 1"; do
  name=${run%%:*}; flags=${run#*:}
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$PY" -m edgeqtl.cli train --preset small $flags --steps "$STEPS" --vision-steps "$VISION_STEPS" \
      --threads 2 --quiet --out "$OUT/$name" > "$OUT/$name.train.log" 2>&1
  end=$(date +%s)
  echo "$name: trained $STEPS steps (+$VISION_STEPS alignment) in $((end - start)) s" | tee "$OUT/$name.time"
  "$PY" -m edgeqtl.cli eval --model "$OUT/$name" --per-family "$PER_FAMILY" --json "$OUT/$name.eval.json" \
      | tee "$OUT/$name.eval.txt"
done
