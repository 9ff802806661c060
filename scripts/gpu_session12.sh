#!/usr/bin/env bash
# Session 6, call 3 (kind nvidia-h200, carry [".whl"]):
#   1. e2e with the 512 MiB model-loss chunks: Qwen3 shape (Liger-Kernel vs ours), Llama with gradient
#      checkpointing (Liger-Kernel vs ours)
#   2. what is alive at the step's peak: ours eager vs ours compiled (29.7 vs 25.0 GiB in run 7)
#   3. modulated RMSNorm: benchmark and CUDA tests (never run on a GPU before)
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 1. e2e (${SECONDS} s)"
  timeout 150 python3 -m liger_plugins.bench_e2e --families qwen3 --setups liger_kernel,ours --out "$OUT/e2e_qwen3" 2>&1 | tail -3
  timeout 150 python3 -m liger_plugins.bench_e2e --families llama --setups liger_kernel_ckpt,ours_ckpt --out "$OUT/e2e_ckpt" 2>&1 | tail -3
  echo "== 2. memory at the peak (${SECONDS} s)"
  timeout 170 python3 scripts/memory_peak.py --setups ours,ours_compile --out "$OUT/memory_peak.json" 2>&1 | grep -v "^W1\|Warn\|warn"
  echo "== 3. modulated RMSNorm (${SECONDS} s)"
  timeout 80 python3 -m liger_plugins.cli bench --quick --ops modulated_rms_norm --impls ours,eager,compile \
    --out "$OUT/bench_modrms" --plots none --warmup 3 --time-limit 60 2>&1 | grep -v "^W1" | tail -6
  run_tests modrms 200 tests/ops/test_modulated_rms_norm.py
  mv "$OUT/t_modrms.log" "$OUT/cuda_tests_modrms.log"
  grep -E "^FAILED|^ERROR" "$OUT/cuda_tests_modrms.log" | head -20
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
