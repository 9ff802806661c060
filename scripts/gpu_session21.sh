#!/usr/bin/env bash
# NOTE: ran in session 10; glu_matmul has since been removed (measured slower), so its steps fail now.
# Prepared in session 9 for the next session (carry [".whl"]), after scripts/gpu_session20.sh (the AdamW
# bf16 rounding change); timeouts sum to 600 s:
#   0. CUDA tests of glu_matmul (act(gate) * up computed inside the down projection's product)
#   1. where the step with our AdamW spends its time (profile by kernel family, GPU idle gaps, the step
#      with a sync per step), ours and Liger-Kernel: what is left between 1.13-1.14x and 1.15x for Llama
#   1b. linear_projections alone (ours vs eager vs compile, fwd+bwd ms, peak)
#   2. compiled: ours_compile with torch's and with our AdamW (ANCHORS' stretch: >= 75k tok/s compiled)
#   3. e2e Llama, 2 rounds: Liger-Kernel, ours, ours + our AdamW, the same + glu_matmul (opt-in, first
#      GPU run), and ours with torch's fused AdamW (the HF Trainer's default optim, adamw_torch_fused;
#      Liger-Kernel with it: 63.0k / 63.4k in runs 13 / 14)
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 0. tests (${SECONDS} s)"
  run_tests glu_matmul 40 tests/ops/test_glu_matmul.py
  collect_tests glu_matmul
  echo "== 1. profile (${SECONDS} s)"
  timeout 90 python3 scripts/profile_e2e.py --setups ours_adamw,liger_kernel --steps 4 --out "$OUT/profile.json" 2>&1 | grep -v "^W1" | tail -50
  echo "== 1b. the q/k/v projections op alone (${SECONDS} s)"
  timeout 70 python3 -m liger_plugins.cli bench --quick --ops linear_projections --impls ours,eager,compile \
    --out "$OUT/bench_projections" --plots none --warmup 3 --time-limit 60 2>&1 | grep -v "^W1" | tail -6
  echo "== 2. compiled (${SECONDS} s)"
  timeout 150 python3 -m liger_plugins.bench_e2e --families llama --setups ours_compile,ours_compile_adamw \
    --out "$OUT/e2e_compile" 2>&1 | grep -v "^W1" | tail -3
  echo "== 3. e2e (${SECONDS} s)"
  timeout 250 python3 -m liger_plugins.bench_e2e --families llama --rounds 2 \
    --setups liger_kernel,ours,ours_adamw,ours_adamw_glu_matmul,ours_fused_adamw \
    --out "$OUT/e2e_llama" 2>&1 | grep -v "^W1" | tail -15
  rm -f "$OUT"/*/e2e.png
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
