#!/usr/bin/env bash
# Session 5's third H200 call (kind nvidia-h200, carry [".whl", ".snap"]; run inside the snapshot):
#   1. CUDA tests: fused MoE (GPU tile sizes, bf16 held to plain torch's error), multi-token attention
#      (+ sparse), GroupNorm (split groups), sparsemax, distillation (soft-only runs the JSD op)
#   2. benchmark: multi-token attention, GroupNorm, sparsemax, and the JSD-distillation loss again
#   3. diagnostics for the next session: host vs GPU time of small norms, RoPE's kernels
source "$(dirname "$0")/gpu_common.sh"
{
  nvidia-smi -L
  echo "== 1. CUDA tests"
  run_tests moe 110 tests/ops/test_fused_moe.py
  run_tests mta 50 tests/ops/test_multi_token_attention.py
  run_tests gn 50 tests/ops/test_group_norm.py
  run_tests sparsemax 30 tests/ops/test_sparsemax.py
  run_tests distill 40 tests/losses/test_distillation.py
  for f in moe mta gn sparsemax distill; do echo "#### $f"; cat "$OUT/t_$f.log"; done > "$OUT/cuda_tests.log"
  rm -f "$OUT"/t_*.log
  grep -E "^FAILED|^ERROR|Timeout" "$OUT/cuda_tests.log" | head -30
  echo "== 2. bench"
  export PYTHONPATH=/tmp/site:$PWD
  timeout 120 python3 -m liger_plugins.cli bench --quick --ops multi_token_attention,group_norm,sparsemax \
    --impls ours,eager,compile,liger --out "$OUT/bench_extra" --plots none --warmup 3 --time-limit 100 2>&1 \
    | grep -v "^W1" | tail -30
  timeout 45 python3 -m liger_plugins.cli bench --quick --ops jsd_loss --impls ours \
    --out "$OUT/bench_jsd" --plots none --warmup 1 --time-limit 30 2>&1 | grep -v "^W1" | tail -4
  echo "== 3. diagnostics"
  timeout 60 python3 scripts/host_profile.py > "$OUT/host_profile.txt" 2>&1; head -8 "$OUT/host_profile.txt"
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
