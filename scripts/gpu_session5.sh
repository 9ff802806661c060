#!/usr/bin/env bash
# Session 4's second H200 call (kind nvidia-h200, carry [".whl", ".snap"]; run inside the snapshot):
#   1. CUDA tests: large sizes (offsets past 2^31), the new ops (MoE, multi-token attention, gate_up
#      SwiGLU, gated_down_proj, fused linear JSD), cross-entropy / linear+CE with the accuracy output
#   2. end to end: Llama 1.2B and Qwen3 shape, HF eager / Liger-Kernel / ours (MLP without its saved
#      activation), with and without checkpointing
#   3. the fused losses the first loss run did not reach (grpo, jsd, cpo)
set -u -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WHL=${WHL:-.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl
{
  nvidia-smi -L
  echo "== 1. CUDA tests"
  LIGER_TEST_DEVICE=cuda PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -p no:cacheprovider -rf --tb=short \
    tests/ops/test_large_sizes.py tests/ops/test_gated_down_proj.py tests/ops/test_fused_moe.py \
    tests/ops/test_multi_token_attention.py tests/ops/test_glu.py tests/ops/test_fused_linear_jsd.py \
    tests/ops/test_cross_entropy.py tests/ops/test_fused_linear_cross_entropy.py > "$OUT/cuda_tests.log" 2>&1
  grep -E "passed|failed|FAILED|Error" "$OUT/cuda_tests.log" | tail -25
  echo "== 2. e2e"
  export PYTHONPATH=/tmp/site:$PWD
  timeout 170 python3 -m liger_plugins.bench_e2e --families llama \
    --setups hf_eager,liger_kernel,ours,liger_kernel_ckpt,ours_ckpt --out "$OUT/e2e_llama"
  timeout 80 python3 -m liger_plugins.bench_e2e --families qwen3 --setups liger_kernel,ours --out "$OUT/e2e_qwen3"
  echo "== 3. losses"
  timeout 110 python3 -m liger_plugins.cli bench --ops grpo_loss,jsd_loss,cpo_loss --impls ours,eager,liger \
    --out "$OUT/bench_losses" --plots none --warmup 2 2>&1 | grep -v "^W1" | tail -20
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
