#!/usr/bin/env bash
# Session 11, second call (carry [".whl"], ~4 min): the AdamW tile chosen inside the step (1024 x 4 warps,
# docs/e2e/h200_run1/adamw_sweep.json) in the e2e runs: CUDA AdamW tests, e2e Llama and Qwen3 (2 rounds:
# Liger-Kernel, ours + our AdamW).
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== tests (${SECONDS} s)"
  run_tests adamw 60 tests/ops/test_adamw.py
  collect_tests adamw
  for family in llama qwen3; do
    echo "== e2e $family (${SECONDS} s)"
    timeout 120 python3 -m liger_plugins.bench_e2e --families $family --rounds 2 --setups liger_kernel,ours_adamw \
      --out "$OUT/e2e_$family" 2>&1 | grep -v "^W1" | tail -6
  done
  rm -f "$OUT"/*/e2e.png
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
