#!/usr/bin/env bash
# Session 8, call 2 (carry [".whl"]), prepared after call 1 (docs/e2e/h100_run12,
# docs/bench/adamw_h100_run1) found the one-launch AdamW kernel at 11% of the copy bandwidth
# (unaligned loads through an address table) and fp32 steps 1 ulp off torch's. It could not start in
# session 8 (device time spent on failed starts); ~7 min:
#   1. CUDA tests of the AdamW kernel (one launch per tensor, explicit fma: fp32 bitwise?)
#   2. which roundings torch's foreach ops use in fp32 (scripts/adamw_rounding_probe.py)
#   3. the optimizer step alone, bf16 and fp32 (scripts/bench_adamw.py)
#   4. e2e Llama, 2 rounds: Liger-Kernel and ours with torch's foreach AdamW, ours with our AdamW,
#      Liger-Kernel with torch's fused AdamW; checkpointing: Liger-Kernel vs ours + our AdamW
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 1. tests (${SECONDS} s)"
  run_tests adamw 60 tests/ops/test_adamw.py
  collect_tests adamw
  echo "== 2. rounding probe (${SECONDS} s)"
  timeout 60 python3 scripts/adamw_rounding_probe.py --out "$OUT/probe.json" 2>&1 | grep -v "^W1" | tail -40
  echo "== 3. optimizer step (${SECONDS} s)"
  timeout 100 python3 scripts/bench_adamw.py --dtype bf16 --out "$OUT/adamw_bf16.json" 2>&1 | grep -v "^W1" | grep -v '^ \|^{\|^}'
  timeout 100 python3 scripts/bench_adamw.py --dtype fp32 --out "$OUT/adamw_fp32.json" 2>&1 | grep -v "^W1" | grep -v '^ \|^{\|^}'
  echo "== 4. e2e (${SECONDS} s)"
  timeout 220 python3 -m liger_plugins.bench_e2e --families llama --rounds 2 \
    --setups liger_kernel,ours,ours_adamw,liger_kernel_fused_adamw --out "$OUT/e2e_llama" 2>&1 | grep -v "^W1" | tail -12
  timeout 70 python3 -m liger_plugins.bench_e2e --families llama --setups liger_kernel_ckpt,ours_ckpt_adamw \
    --out "$OUT/e2e_ckpt" 2>&1 | grep -v "^W1" | tail -3
  rm -f "$OUT"/*/e2e.png
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
