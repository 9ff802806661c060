#!/usr/bin/env bash
# Session 12's second call (~4 min): AdamW stepped inside backward (scripts/adamw_overlap_probe.py: after /
# inline / side stream, exactness against the step after backward, peak memory), sibling projections as
# one product over concatenated weights (scripts/projection_concat_probe.py), and our AdamW alone with
# the 1024 x 4 tile on this card (scripts/bench_adamw.py).
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== AdamW inside backward (${SECONDS} s)"
  timeout 200 python3 scripts/adamw_overlap_probe.py --out "$OUT/overlap.json" 2>&1 | grep -v "^W1" | tail -12
  echo "== concatenated projections (${SECONDS} s)"
  timeout 120 python3 scripts/projection_concat_probe.py --out "$OUT/concat.json" 2>&1 | tail -16
  echo "== AdamW alone (${SECONDS} s)"
  timeout 150 python3 scripts/bench_adamw.py --out "$OUT/adamw_bench.json" 2>&1 | grep -v "^W1" | tail -12
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
