#!/usr/bin/env bash
# Session 9, call 2 (carry [".whl"]), after call 1 (docs/e2e/h100_run13, docs/bench/adamw_h100_run2)
# measured our AdamW bitwise-equal to torch's foreach step at 84% (bf16) / 96% (fp32) of the copy
# bandwidth and Llama with it at 1.145x Liger-Kernel. New since: the attention's q/k/v projections as
# one op (qkv_projections). ~8 min:
#   1. CUDA tests of linear_projections (values bitwise F.linear, gradients vs float64)
#   2. e2e Llama, 2 rounds: Liger-Kernel and ours with torch's foreach AdamW, ours with our AdamW,
#      Liger-Kernel with torch's fused AdamW
#   3. e2e Qwen3 shape, 2 rounds: Liger-Kernel, ours, ours with our AdamW
#   4. gradient checkpointing: Liger-Kernel vs ours + our AdamW
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 1. tests (${SECONDS} s)"
  run_tests projections 90 tests/ops/test_linear_projections.py
  collect_tests projections
  echo "== 2. e2e llama (${SECONDS} s)"
  timeout 230 python3 -m liger_plugins.bench_e2e --families llama --rounds 2 \
    --setups liger_kernel,ours,ours_adamw,liger_kernel_fused_adamw --out "$OUT/e2e_llama" 2>&1 | grep -v "^W1" | tail -12
  echo "== 3. e2e qwen3 (${SECONDS} s)"
  timeout 170 python3 -m liger_plugins.bench_e2e --families qwen3 --rounds 2 \
    --setups liger_kernel,ours,ours_adamw --out "$OUT/e2e_qwen3" 2>&1 | grep -v "^W1" | tail -9
  echo "== 4. checkpointing (${SECONDS} s)"
  timeout 75 python3 -m liger_plugins.bench_e2e --families llama --setups liger_kernel_ckpt,ours_ckpt_adamw \
    --out "$OUT/e2e_ckpt" 2>&1 | grep -v "^W1" | tail -3
  rm -f "$OUT"/*/e2e.png
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
