#!/usr/bin/env bash
# The GPU integration matrix, on one host with 2 GPUs (run from the repository root):
#
#   bash integrations/gpu_matrix.sh
#
# Through the device tool: kind nvidia-h200-x2, carry [".whl-ds"], command `bash integrations/gpu_matrix.sh`.
# DeepSpeed is not installed there: .whl-ds/ holds its wheel (built from the sdist; pure Python) and the
# requirements that machine lacks (hjson, pydantic, pydantic-core, annotated-types, typing-inspection,
# typing-extensions), installed into /tmp/site-ds first.
# Runs tests/integrations/test_packing_checkpointing.py on CUDA, then `integrations/run_all.py --device gpu`:
# the HF Trainer under accelerate DDP / FSDP1 / FSDP2 / ZeRO-2 / ZeRO-3 (fp32 and bf16), the FSDP2
# peak-memory measurement (ANCHORS.md Llama, 4 x 2048 tokens per GPU, with vs without the plugin), the
# engines driven directly, Lightning's DDP / FSDP / ModelParallel / DeepSpeed strategies, then FSDP2 with
# CPU offload + activation checkpointing, packed batches and SDPA's flash backend. Combinations not
# started within BUDGET_S seconds (default 270) of the matrix are listed as skipped, and each one is
# stopped after 180 s, so the whole script ends within about 8 minutes, inside the 10-minute limit.
# Output, under $OUT (./out where unset): gpu_matrix.log and matrix.json (every run's summary; the memory
# numbers under memory_fsdp2.summary.memory).
set -u -o pipefail
OUT=${OUT:-out}
BUDGET_S=${BUDGET_S:-270}
mkdir -p "$OUT"
# NVLink multicast stays off (shared hosts), also in every child process.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

matrix() {
  nvidia-smi -L
  if compgen -G ".whl-ds/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-ds \
      .whl-ds/*.whl || return 1
    export PYTHONPATH=/tmp/site-ds${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 - <<'PY' || return 1
import importlib.util
import torch, triton, transformers, accelerate, lightning
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, "lightning", lightning.__version__, "GPUs", torch.cuda.device_count())
if importlib.util.find_spec("deepspeed"):
    import deepspeed
    print("deepspeed", deepspeed.__version__)
else:
    print("deepspeed: not installed (the ZeRO combinations are skipped)")
PY
  echo "== packed batches and activation checkpointing, real kernels on CUDA"
  LIGER_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/integrations/test_packing_checkpointing.py
  local tests_rc=$?
  echo "== matrix"
  python3 integrations/run_all.py --device gpu --out-dir "$OUT" --budget "$BUDGET_S" --timeout 180
  local rc=$?
  [ $tests_rc -ne 0 ] && rc=1
  echo "== done in ${SECONDS} s, exit ${rc}"
  return $rc
}

matrix 2>&1 | tee "$OUT/gpu_matrix.log"
