#!/usr/bin/env bash
# Session 6, call 2 (kind nvidia-h200, carry [".whl"]): after the model loss's 512 MiB chunks and the
# causal-mask decision under torch.compile.
#   1. e2e Llama: Liger-Kernel vs ours, 2 rounds in alternating order
#   2. e2e Llama compiled: HF only, HF + only our causal-mask decision, ours (each one round)
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 1. e2e (${SECONDS} s)"
  timeout 220 python3 -m liger_plugins.bench_e2e --families llama --setups liger_kernel,ours --rounds 2 \
    --out "$OUT/e2e" 2>&1 | tail -8
  echo "== 2. e2e compiled (${SECONDS} s)"
  timeout 330 python3 -m liger_plugins.bench_e2e --families llama --setups hf_compile,hf_compile_causal,ours_compile \
    --out "$OUT/e2e_compile" 2>&1 | grep -v "^W1" | tail -8
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
