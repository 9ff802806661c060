#!/usr/bin/env bash
# NOTE: ran in session 10; glu_matmul has since been removed (measured slower), so its steps fail now.
# Kernel checks prepared in session 9 (it could not start then: device time spent), for the next
# session's first call (carry [".whl"]), ~5 min; then scripts/gpu_session21.sh (e2e):
#   1. CUDA tests: the AdamW kernel (bf16 now rounds with the conversion instruction; bitwise equal to
#      torch's foreach step, every dtype; small tensors through torch's step; DTensor shards) and
#      glu_matmul (act(gate) * up inside the down projection's product)
#   2. the AdamW step alone, bf16 (run 13: 8.47 ms, 84% of the copy bandwidth, bit-arithmetic rounding)
#   3. gated_down_proj alone, two-pass forward vs glu_matmul (LIGER_GLU_MATMUL=1), fwd+bwd ms
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 1. tests (${SECONDS} s)"
  run_tests adamw 90 tests/ops/test_adamw.py
  run_tests glu_matmul 60 tests/ops/test_glu_matmul.py tests/ops/test_gated_down_proj.py tests/ops/test_gated_mlp.py
  collect_tests adamw glu_matmul
  echo "== 2. optimizer step (${SECONDS} s)"
  timeout 100 python3 scripts/bench_adamw.py --dtype bf16 --out "$OUT/adamw_bf16.json" 2>&1 | grep -v "^W1" | grep -v '^ \|^{\|^}'
  echo "== 3. gated_down_proj: two passes, then glu_matmul (${SECONDS} s)"
  timeout 80 python3 -m liger_plugins.cli bench --quick --ops gated_down_proj --impls ours,eager,compile \
    --out "$OUT/bench_two_pass" --plots none --warmup 3 --time-limit 60 2>&1 | grep -v "^W1" | tail -5
  LIGER_GLU_MATMUL=1 timeout 120 python3 -m liger_plugins.cli bench --quick --ops gated_down_proj --impls ours \
    --out "$OUT/bench_glu_matmul" --plots none --warmup 3 --time-limit 100 2>&1 | grep -v "^W1" | tail -4
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
