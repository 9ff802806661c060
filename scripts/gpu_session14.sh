#!/usr/bin/env bash
# Session 7, call 1 (kind nvidia-h200, carry [".whl"]):
#   1. CUDA tests of glu / gated_down_proj (the glu backward kernel now also writes c = f(a) * b),
#      and fused_add_rms_norm (now in every pre-norm decoder layer)
#   2. which torch op (with shapes) spends the step's GPU time (ours): matmul rates, cats, idle gaps
#   3. e2e Llama, Liger-Kernel vs ours, 2 alternating rounds; Qwen3 shape, one round
#      (ours now with the residual joins in the norms' kernels)
#   4. compiled + ours after gated_down_proj became one custom op (session 6's prepared call 13)
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 1. tests (${SECONDS} s)"
  run_tests glu 150 tests/ops/test_glu.py tests/ops/test_gated_down_proj.py tests/ops/test_fused_add_rms_norm.py
  collect_tests glu
  echo "== 2. op profile (${SECONDS} s)"
  timeout 120 python3 scripts/profile_e2e.py --setups ours --ops --steps 2 --out "$OUT/profile_ops.json" \
    2>&1 | grep -v "^W1\|Warn\|warn"
  echo "== 3. e2e (${SECONDS} s)"
  timeout 200 python3 -m liger_plugins.bench_e2e --families llama --setups liger_kernel,ours --rounds 2 \
    --out "$OUT/e2e" 2>&1 | grep -v "^W1" | tail -6
  timeout 100 python3 -m liger_plugins.bench_e2e --families qwen3 --setups liger_kernel,ours \
    --out "$OUT/e2e_qwen3" 2>&1 | grep -v "^W1" | tail -2
  echo "== 4. compiled (${SECONDS} s)"
  timeout 120 python3 -m liger_plugins.bench_e2e --families llama --setups ours_compile \
    --out "$OUT/e2e_compile" 2>&1 | grep -v "^W1" | tail -2
  timeout 100 python3 scripts/memory_peak.py --setups ours_compile --out "$OUT/memory_peak.json" 2>&1 \
    | grep -v "^W1\|Warn\|warn" | head -30
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
