#!/usr/bin/env bash
# Prepared in session 10 for its last call, which could not start (no machine came): for the next
# session's first call (carry [".whl"]), ~7 min:
#   1. CUDA tests of AdamW (the optimizer now launches the kernel without re-checking its tensors) and of
#      the launch device guard (its two-GPU test skips on one GPU)
#   2. e2e Llama, 2 rounds: Liger-Kernel, ours, ours + our AdamW
#   3. the AdamW kernel's tile inside the e2e step (its kernels took 10.1 ms there vs 8.0 ms alone)
#   4. the AdamW step alone, bf16 (host time of the step after the launch change)
#   5. e2e Qwen3 shape, 2 rounds, the same setups
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 1. tests (${SECONDS} s)"
  run_tests adamw 60 tests/ops/test_adamw.py tests/ops/test_device_guard.py
  collect_tests adamw
  echo "== 2. e2e Llama (${SECONDS} s)"
  timeout 150 python3 -m liger_plugins.bench_e2e --families llama --rounds 2 --setups liger_kernel,ours,ours_adamw \
    --out "$OUT/e2e_llama" 2>&1 | grep -v "^W1" | tail -9
  echo "== 3. AdamW tile in the e2e step (${SECONDS} s)"
  timeout 120 python3 scripts/adamw_e2e_sweep.py --out "$OUT/adamw_sweep.json" 2>&1 | grep -v "^W1" | tail -6
  echo "== 4. AdamW step alone (${SECONDS} s)"
  timeout 90 python3 scripts/bench_adamw.py --dtype bf16 --out "$OUT/adamw_bf16.json" 2>&1 | grep -v "^W1" | grep -v '^ \|^{\|^}'
  echo "== 5. e2e Qwen3 shape (${SECONDS} s)"
  timeout 150 python3 -m liger_plugins.bench_e2e --families qwen3 --rounds 2 --setups liger_kernel,ours,ours_adamw \
    --out "$OUT/e2e_qwen3" 2>&1 | grep -v "^W1" | tail -9
  rm -f "$OUT"/*/e2e.png
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
