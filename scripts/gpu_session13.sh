#!/usr/bin/env bash
# Session 6, call 4 (kind nvidia-h200, carry [".whl"]): gated_down_proj as one custom op under
# torch.compile (its backward op recomputes act(gate) * up, so compile no longer saves it):
# e2e Llama, ours eager vs ours compiled, one run each on the same machine.
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  timeout 300 python3 -m liger_plugins.bench_e2e --families llama --setups ours,ours_compile \
    --out "$OUT/e2e" 2>&1 | grep -v "^W1" | tail -4
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
