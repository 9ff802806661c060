#!/usr/bin/env bash
# Session 5's first H200 call (kind nvidia-h200, carry [".whl"]):
#   1. CUDA tests of the ops never run on the GPU since their last change, one timeout per file, full report
#   2. the benchmark of the breadth ops (EXTRA_OPS) and the two fused losses not measured yet (cpo, jsd)
source "$(dirname "$0")/gpu_common.sh"
{
  nvidia-smi -L
  echo "== 1. CUDA tests"
  run_tests moe 70 tests/ops/test_fused_moe.py
  run_tests mta 60 tests/ops/test_multi_token_attention.py
  run_tests glu 60 tests/ops/test_glu.py
  run_tests fljsd 60 tests/ops/test_fused_linear_jsd.py
  run_tests rope 90 tests/ops/test_rope.py tests/ops/test_mrope.py tests/ops/test_llama4_rope.py
  run_tests acc 60 tests/ops/test_cross_entropy.py tests/ops/test_fused_linear_cross_entropy.py -k accuracy
  run_tests compile 120 tests/test_compile.py
  cat "$OUT"/t_*.log > "$OUT/cuda_tests.log"; rm -f "$OUT"/t_*.log
  grep -E "^FAILED|^ERROR" "$OUT/cuda_tests.log" | head -40
  echo "== 2. bench"
  export PYTHONPATH=/tmp/site:$PWD
  extra=$(python3 -c "from liger_kernels.bench import EXTRA_OPS; print(','.join(EXTRA_OPS))")
  timeout 200 python3 -m liger_plugins.cli bench --quick --ops "$extra" --impls ours,eager,compile,liger \
    --out "$OUT/bench_extra" --plots none --warmup 3 --time-limit 180 2>&1 | grep -v "^W1" | tail -60
  timeout 80 python3 -m liger_plugins.cli bench --quick --ops cpo_loss,jsd_loss --impls ours,eager,liger \
    --out "$OUT/bench_losses" --plots none --warmup 2 --time-limit 60 2>&1 | grep -v "^W1" | tail -12
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
