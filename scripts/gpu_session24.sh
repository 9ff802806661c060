#!/usr/bin/env bash
# Prepared in session 11 for the next session's first call (carry [".whl"], ~6 min): the AdamW tile chosen
# inside the step (1024 x 4 warps, docs/e2e/h200_run1/adamw_sweep.json) and the packed-sequence check
# without its host sync, neither timed end to end yet: CUDA AdamW and device-guard tests, e2e Llama and
# Qwen3 (2 rounds: Liger-Kernel, ours, ours + our AdamW), a profile with the host's gaps.
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== tests (${SECONDS} s)"
  run_tests adamw 60 tests/ops/test_adamw.py tests/ops/test_device_guard.py
  collect_tests adamw
  for family in llama qwen3; do
    echo "== e2e $family (${SECONDS} s)"
    timeout 170 python3 -m liger_plugins.bench_e2e --families $family --rounds 2 \
      --setups liger_kernel,ours,ours_adamw --out "$OUT/e2e_$family" 2>&1 | grep -v "^W1" | tail -9
  done
  echo "== profile with host gaps (${SECONDS} s)"
  timeout 90 python3 scripts/profile_e2e.py --setups ours_adamw --steps 4 --gaps --out "$OUT/profile.json" 2>&1 \
    | grep -v "^W1" | tail -30
  rm -f "$OUT"/*/e2e.png
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
