#!/usr/bin/env bash
# Session 7, call 4 (kind nvidia-h200, carry [".whl"]): the final e2e numbers of the session, after the
# glu tiles of the sweep (docs/bench/glu_tiles_h100.json).
#   1. CUDA tests of the glu kernels with the new tiles
#   2. e2e Llama and Qwen3 shape, Liger-Kernel vs ours, 2 alternating rounds each
#   3. compiled + ours (no KV cache on the loss path now)
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 1. tests (${SECONDS} s)"
  run_tests glu 90 tests/ops/test_glu.py
  collect_tests glu
  echo "== 2. e2e (${SECONDS} s)"
  timeout 200 python3 -m liger_plugins.bench_e2e --families llama --setups liger_kernel,ours --rounds 2 \
    --out "$OUT/e2e_llama" 2>&1 | grep -v "^W1" | tail -6
  timeout 200 python3 -m liger_plugins.bench_e2e --families qwen3 --setups liger_kernel,ours --rounds 2 \
    --out "$OUT/e2e_qwen3" 2>&1 | grep -v "^W1" | tail -6
  echo "== 3. compiled (${SECONDS} s)"
  timeout 120 python3 -m liger_plugins.bench_e2e --families llama --setups ours_compile \
    --out "$OUT/e2e_compile" 2>&1 | grep -v "^W1" | tail -2
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
