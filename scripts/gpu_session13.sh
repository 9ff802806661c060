#!/usr/bin/env bash
# Prepared in session 6 for the next H200/H100 call (kind nvidia-h200, carry [".whl"]); it could not run
# then (no machine came, then no device time left): gated_down_proj as one custom op under torch.compile
# (its backward op recomputes act(gate) * up, so compile should no longer keep 3.75 GiB of it).
#   1. e2e Llama, ours eager vs ours compiled vs HF compiled with only our causal-mask decision
#   2. what is alive at the compiled step's peak
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  timeout 330 python3 -m liger_plugins.bench_e2e --families llama --setups ours,ours_compile,hf_compile_causal \
    --out "$OUT/e2e" 2>&1 | grep -v "^W1" | tail -4
  timeout 150 python3 scripts/memory_peak.py --setups ours_compile --out "$OUT/memory_peak.json" 2>&1 \
    | grep -v "^W1\|Warn\|warn"
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
