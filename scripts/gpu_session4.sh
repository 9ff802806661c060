#!/usr/bin/env bash
# Session 4's first H200 x2 call (device kind nvidia-h200-x2, carry [".whl", ".whl-ds", ".snap"]; run from
# the repository root, or from a `git archive` snapshot of it). Each phase has its own time box so the
# whole call ends inside 600 s; everything lands under $OUT.
#   1. both GPUs: the integration-matrix combinations the first 2-GPU run left (time budget) or failed
#   2. GPU 0: the fused-linear losses vs the unfused loss / torch.compile / Liger-Kernel (benchmark runner)
#      GPU 1 at the same time: large-size parity (offsets past 2^31) and the new ops' tests on CUDA,
#      then a profile of one end-to-end training step by kernel family
set -u -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WHL=${WHL:-.whl}; WHL_DS=${WHL_DS:-.whl-ds}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-ds "$WHL_DS"/*.whl
{
  nvidia-smi -L
  echo "== 1. matrix remainder (2 GPUs)"
  PYTHONPATH=/tmp/site-ds:$PWD timeout 230 python3 integrations/run_all.py --device gpu --timeout 110 \
    --only lightning_deepspeed_gpu,hf_fsdp2_packed,hf_fsdp2_sdpa_flash,hf_fsdp2_offload_ckpt,hf_zero3_packed_ckpt \
    --out-dir "$OUT/matrix" 2>&1 | grep -v "^\[rank" | tail -40
  echo "== 2. losses bench (GPU 0) | CUDA tests + profile (GPU 1)"
  (
    export CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/site:$PWD
    timeout 120 python3 -m liger_plugins.cli bench --ops dpo_loss --out "$OUT/bench_dpo" --plots none --warmup 3
    timeout 150 python3 -m liger_plugins.cli bench --ops orpo_loss,simpo_loss,kto_loss,grpo_loss,jsd_loss,cpo_loss \
      --impls ours,eager,liger --out "$OUT/bench_losses" --plots none --warmup 1 --time-limit 130
  ) > "$OUT/bench.log" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$PWD LIGER_TEST_DEVICE=cuda
    timeout 170 python3 -m pytest -q -p no:cacheprovider -rf tests/ops/test_large_sizes.py tests/ops/test_mrope.py \
      tests/ops/test_llama4_rope.py tests/ops/test_fused_moe.py tests/ops/test_multi_token_attention.py \
      tests/ops/test_glu.py 2>&1 | tail -40
    timeout 90 python3 scripts/profile_e2e.py --setups hf_eager,ours --out "$OUT/profile_e2e.json"
  ) > "$OUT/tests.log" 2>&1 &
  wait
  cat "$OUT/bench.log" | grep -v Warning | tail -60
  cat "$OUT/tests.log"
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
