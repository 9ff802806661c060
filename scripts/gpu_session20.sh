#!/usr/bin/env bash
# Session 9, call 3 (carry [".whl"]): the AdamW kernel rounding bf16 with the conversion instruction
# (the bit-arithmetic rounding stays for the interpreter) after call 1 found the bf16 step at 84% of the
# copy bandwidth, likely compute-bound (seven roundings of ~6 integer operations per element). ~4 min:
#   1. CUDA tests of the AdamW kernel (bitwise equal to torch's foreach step, every dtype)
#   2. the optimizer step alone, bf16
#   3. e2e Llama, one round: ours + our AdamW, Liger-Kernel
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 1. tests (${SECONDS} s)"
  run_tests adamw 60 tests/ops/test_adamw.py
  collect_tests adamw
  echo "== 2. optimizer step (${SECONDS} s)"
  timeout 100 python3 scripts/bench_adamw.py --dtype bf16 --out "$OUT/adamw_bf16.json" 2>&1 | grep -v "^W1" | grep -v '^ \|^{\|^}'
  echo "== 3. e2e llama, one round (${SECONDS} s)"
  timeout 90 python3 -m liger_plugins.bench_e2e --families llama --setups ours_adamw,liger_kernel \
    --out "$OUT/e2e_llama" 2>&1 | grep -v "^W1" | tail -3
  rm -f "$OUT"/*/e2e.png
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
