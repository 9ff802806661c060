#!/usr/bin/env bash
# Prepared for the next H200 call (kind nvidia-h200, carry [".whl"]): what session 5 wrote but could not
# run on the GPU (its device time was spent).
#   1. CUDA tests: modulated RMSNorm (new), in-place-safe outputs of every op (layout change), GRPO's new
#      loss types and the cosine distillation loss on CUDA tensors
#   2. benchmark: modulated RMSNorm, the cosine and GRPO(cispo) losses; the core anchors once more (the
#      in-place change touched glu / fused_add_rms_norm / softmax launch paths)
#   3. end to end: Llama, Liger-Kernel vs ours (the MLP path changed with the glu output allocation)
source "$(dirname "$0")/gpu_common.sh"
{
  nvidia-smi -L
  echo "== 1. CUDA tests"
  run_tests modrms 90 tests/ops/test_modulated_rms_norm.py
  run_tests inplace 60 tests/ops/test_inplace_outputs.py
  run_tests losses 90 tests/losses/test_kto_grpo.py tests/losses/test_distillation.py
  collect_tests modrms inplace losses
  echo "== 2. bench"
  export PYTHONPATH=/tmp/site:$PWD
  timeout 120 python3 -m liger_plugins.cli bench --quick --ops modulated_rms_norm,swiglu,fused_add_rms_norm,softmax \
    --impls ours,eager,compile,liger --out "$OUT/bench_ops" --plots none --warmup 3 --time-limit 100 2>&1 \
    | grep -v "^W1" | tail -12
  timeout 100 python3 -m liger_plugins.cli bench --quick --ops cosine_loss --impls ours,eager,liger \
    --out "$OUT/bench_losses" --plots none --warmup 1 --time-limit 80 2>&1 | grep -v "^W1" | tail -6
  echo "== 3. e2e"
  timeout 150 python3 -m liger_plugins.bench_e2e --families llama --setups liger_kernel,ours --out "$OUT/e2e" 2>&1 | tail -4
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
