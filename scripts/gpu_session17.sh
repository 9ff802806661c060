#!/usr/bin/env bash
# Session 8, call 1 (carry [".whl"]): the one-pass AdamW (liger_kernels.optim.AdamW).
#   1. CUDA tests of the AdamW kernel/optimizer (bitwise vs torch's foreach step) and bench_e2e
#   2. the optimizer step alone over the e2e Llama parameters, bf16 and fp32 (scripts/bench_adamw.py)
#   3. e2e Llama: Liger-Kernel vs ours, each with torch's foreach AdamW and with a one-pass AdamW
#      (ours: liger_kernels.optim.AdamW, same numbers; Liger-Kernel: torch's fused=True)
#   4. gradient checkpointing: Liger-Kernel vs ours with our AdamW (peak memory at the optimizer step)
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 1. tests (${SECONDS} s)"
  run_tests adamw 120 tests/ops/test_adamw.py
  collect_tests adamw
  echo "== 2. optimizer step (${SECONDS} s)"
  timeout 150 python3 scripts/bench_adamw.py --dtype bf16 --out "$OUT/adamw_bf16.json" 2>&1 | grep -v "^W1" | grep -v '^ \|^{\|^}'
  timeout 100 python3 scripts/bench_adamw.py --dtype fp32 --out "$OUT/adamw_fp32.json" 2>&1 | grep -v "^W1" | grep -v '^ \|^{\|^}'
  echo "== 3. e2e (${SECONDS} s)"
  timeout 240 python3 -m liger_plugins.bench_e2e --families llama \
    --setups liger_kernel,ours,ours_adamw,liger_kernel_fused_adamw --out "$OUT/e2e_llama" 2>&1 | grep -v "^W1" | tail -5
  echo "== 4. checkpointing (${SECONDS} s)"
  timeout 120 python3 -m liger_plugins.bench_e2e --families llama --setups liger_kernel_ckpt,ours_ckpt_adamw \
    --out "$OUT/e2e_ckpt" 2>&1 | grep -v "^W1" | tail -3
  rm -f "$OUT"/*/e2e.png
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
