#!/usr/bin/env bash
# Session 11, last call (carry [".whl"], ~2 min, little device time left): e2e Llama, one round, Liger-Kernel
# vs ours + our AdamW, with the AdamW tile 1024 x 4 and no packed-sequence sync in the loss path.
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  timeout 140 python3 -m liger_plugins.bench_e2e --families llama --rounds 1 --setups liger_kernel,ours_adamw \
    --out "$OUT/e2e_llama" 2>&1 | grep -v "^W1" | tail -4
  rm -f "$OUT"/*/e2e.png
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
