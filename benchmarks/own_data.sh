#!/usr/bin/env bash
# Issue 14's benchmark: the users'-own-data path against the built-in one, and quantizer
# adaptation of a frozen 16-bit model. Prints one line per figure; everything lands in
# $OUT (default runs/own-data; about 2 GB of PNGs at the default steps). About 40 min on
# 2 cores.
#
#   bash benchmarks/own_data.sh [STEPS] [ADAPT_STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
E=${EDGEQTL:-.venv/bin/edgeqtl}
OUT=${OUT:-runs/own-data}
STEPS=${1:-2000}
ADAPT=${2:-1000}
mkdir -p "$OUT"
t() { local s=$(date +%s); "$@"; echo "  ($(( $(date +%s) - s )) s)"; }
acc() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{sys.argv[2]}: {100*r['accuracy']:.2f}% of {r['records']}\", r.get('agreement') and f\"agreement with unsplit {100*r['agreement']:.2f}%\" or '')" "$@"; }

# 20,000 records (the adaptation runs' data), and as many records as STEPS batches of 64
# draw (the built-in stream never repeats a sample: a fair comparison needs no repeats either)
ALL=$(( STEPS * 64 ))
[ -f "$OUT/shapes/train.json" ] || $E data export --world shapes --out "$OUT/shapes" --train-samples 20000 --heldout-per-family 100
[ -f "$OUT/shapes-all/train.json" ] || $E data export --world shapes --out "$OUT/shapes-all" --train-samples "$ALL" --heldout-per-family 100
HELD="$OUT/shapes/heldout.json"

echo "== 1. from scratch, 2 bits, $STEPS steps: --data files against the built-in stream, same generic recipe (pixel probe)"
[ -f "$OUT/data-all/edgeqtl_split.json" ] || t $E train --preset tiny --bits 2 --data "$OUT/shapes-all/train.json" --steps "$STEPS" --out "$OUT/data-all" --quiet
[ -f "$OUT/data/edgeqtl_split.json" ] || t $E train --preset tiny --bits 2 --data "$OUT/shapes/train.json" --steps "$STEPS" --out "$OUT/data" --quiet
[ -f "$OUT/world-pixels/edgeqtl_split.json" ] || t $E train --preset tiny --bits 2 --probe pixels --curriculum-steps 0 --steps "$STEPS" --out "$OUT/world-pixels" --quiet
[ -f "$OUT/world-cells/edgeqtl_split.json" ] || t $E train --preset tiny --bits 2 --steps "$STEPS" --out "$OUT/world-cells" --quiet
for m in data-all data world-pixels world-cells; do
  $E eval --model "$OUT/$m" --data "$HELD" --json "$OUT/$m.eval.json" > /dev/null
  acc "$OUT/$m.eval.json" "$m"
done

echo "== 2. adaptation: 16-bit baseline ($STEPS steps), then a fresh 2-bit quantizer, VLM frozen, $ADAPT steps on the files"
[ -f "$OUT/fp16/edgeqtl_split.json" ] || t $E train --preset tiny --baseline --steps "$STEPS" --out "$OUT/fp16" --quiet
$E eval --model "$OUT/fp16" --data "$HELD" --json "$OUT/fp16.eval.json" > /dev/null
acc "$OUT/fp16.eval.json" "fp16 baseline"
for tr in quantizer quantizer,projector,lora; do
  d="$OUT/adapt-${tr//,/-}"
  [ -f "$d/edgeqtl_split.json" ] || t $E train --model "$OUT/fp16" --bits 2 --data "$OUT/shapes/train.json" --steps "$ADAPT" --trainable "$tr" --out "$d" --quiet
  $E eval --model "$d" --data "$HELD" --json "$d.eval.json" > /dev/null
  acc "$d.eval.json" "adapted ($tr)"
done
