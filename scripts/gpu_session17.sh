#!/usr/bin/env bash
# Session 8, call 1 (carry [".whl"]): the one-pass AdamW (liger_kernels.optim.AdamW) and the residual
# summed in down_proj's product, the MLP as one op (gated_mlp).
#   1. CUDA tests: AdamW (bitwise vs torch's foreach step), gated_down_proj, decoder-layer patch
#   2. e2e Llama: Liger-Kernel vs ours, with torch's foreach AdamW, and ours with the one-pass AdamW
#      (liger_kernels.optim.AdamW, same numbers); 2 rounds
#   3. the optimizer step alone over the e2e Llama parameters, bf16 (scripts/bench_adamw.py)
#   4. e2e Qwen3 shape: Liger-Kernel, ours, ours + our AdamW; 1 round
#   5. gradient checkpointing: ours with our AdamW (peak memory at the optimizer step)
# (trimmed to ~7 min: the session's device time went to failed starts)
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 1. tests (${SECONDS} s)"
  run_tests adamw 60 tests/ops/test_adamw.py
  run_tests gdp 60 tests/ops/test_gated_down_proj.py tests/ops/test_gated_mlp.py tests/patching/test_patch_decoder_layer.py
  collect_tests adamw gdp
  echo "== 2. e2e Llama (${SECONDS} s)"
  timeout 160 python3 -m liger_plugins.bench_e2e --families llama --rounds 2 \
    --setups liger_kernel,ours,ours_adamw --out "$OUT/e2e_llama" 2>&1 | grep -v "^W1" | tail -12
  echo "== 3. optimizer step (${SECONDS} s)"
  timeout 100 python3 scripts/bench_adamw.py --dtype bf16 --out "$OUT/adamw_bf16.json" 2>&1 | grep -v "^W1" | grep -v '^ \|^{\|^}'
  echo "== 4. e2e Qwen3 (${SECONDS} s)"
  timeout 80 python3 -m liger_plugins.bench_e2e --families qwen3 \
    --setups liger_kernel,ours,ours_adamw --out "$OUT/e2e_qwen3" 2>&1 | grep -v "^W1" | tail -9
  echo "== 5. checkpointing (${SECONDS} s)"
  timeout 45 python3 -m liger_plugins.bench_e2e --families llama --setups ours_ckpt_adamw \
    --out "$OUT/e2e_ckpt" 2>&1 | grep -v "^W1" | tail -3
  rm -f "$OUT"/*/e2e.png
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
