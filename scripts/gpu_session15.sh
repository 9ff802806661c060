#!/usr/bin/env bash
# Session 7, call 2 (kind nvidia-h200, carry [".whl"]): after the fused loss path stopped building a KV
# cache (use_cache=False) and the decoder-layer patch learned transformers' forward-level checkpointing.
#   1. e2e Llama and Qwen3 shape, Liger-Kernel vs ours, 2 alternating rounds each
#   2. e2e Llama with gradient checkpointing, Liger-Kernel vs ours
#   3. GPU time of one step of ours by kernel family (the 32 cache cats should be gone)
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 1. e2e (${SECONDS} s)"
  timeout 200 python3 -m liger_plugins.bench_e2e --families llama --setups liger_kernel,ours --rounds 2 \
    --out "$OUT/e2e_llama" 2>&1 | grep -v "^W1" | tail -6
  timeout 200 python3 -m liger_plugins.bench_e2e --families qwen3 --setups liger_kernel,ours --rounds 2 \
    --out "$OUT/e2e_qwen3" 2>&1 | grep -v "^W1" | tail -6
  echo "== 2. checkpointing (${SECONDS} s)"
  timeout 150 python3 -m liger_plugins.bench_e2e --families llama --setups liger_kernel_ckpt,ours_ckpt \
    --out "$OUT/e2e_ckpt" 2>&1 | grep -v "^W1" | tail -2
  rm -f "$OUT"/e2e_*/e2e.png
  echo "== 3. profile (${SECONDS} s)"
  timeout 100 python3 scripts/profile_e2e.py --setups ours --steps 2 --out "$OUT/profile.json" \
    2>&1 | grep -v "^W1\|Warn\|warn" | head -12
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
