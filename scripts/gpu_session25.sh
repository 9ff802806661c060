#!/usr/bin/env bash
# Prepared in session 12 for the next call (carry [".whl"], <= 500 s), best on an H200 (the issue's card):
# e2e Llama and Qwen3 with the AdamW tile and the sync removal (H100 run 16: Llama 1.150x), gradient
# checkpointing with our AdamW after backward vs inside backward (peak memory), and the in-backward
# probe with its determinism baseline (a second run of the step after backward).
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  for family in llama qwen3; do
    echo "== e2e $family (${SECONDS} s)"
    timeout 130 python3 -m liger_plugins.bench_e2e --families $family --rounds 2 \
      --setups liger_kernel,ours_adamw --out "$OUT/e2e_$family" 2>&1 | grep -v "^W1" | tail -6
  done
  echo "== e2e llama, gradient checkpointing (${SECONDS} s)"
  timeout 100 python3 -m liger_plugins.bench_e2e --families llama --rounds 1 \
    --setups ours_ckpt_adamw,ours_ckpt_adamw_in_backward --out "$OUT/e2e_ckpt" 2>&1 | grep -v "^W1" | tail -4
  echo "== AdamW inside backward (${SECONDS} s)"
  timeout 130 python3 scripts/adamw_overlap_probe.py --out "$OUT/overlap.json" 2>&1 | grep -v "^W1" | tail -12
  rm -f "$OUT"/*/e2e.png
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
