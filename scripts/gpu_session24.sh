#!/usr/bin/env bash
# Session 12's first call (carry [".whl"], <= 450 s): the AdamW tile chosen inside the step (1024 x 4 warps)
# and the packed-sequence check without its host sync, in e2e Llama (2 rounds: Liger-Kernel, ours + our
# AdamW, ours + our AdamW stepping inside backward); the in-backward step on a second stream too
# (scripts/adamw_overlap_probe.py); sibling projections as one product (scripts/projection_concat_probe.py);
# CUDA tests of AdamW and the device guard last.
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== e2e llama (${SECONDS} s)"
  timeout 170 python3 -m liger_plugins.bench_e2e --families llama --rounds 2 \
    --setups liger_kernel,ours_adamw,ours_adamw_in_backward --out "$OUT/e2e_llama" 2>&1 | grep -v "^W1" | tail -9
  echo "== AdamW inside backward (${SECONDS} s)"
  timeout 150 python3 scripts/adamw_overlap_probe.py --out "$OUT/overlap.json" 2>&1 | grep -v "^W1" | tail -12
  echo "== concatenated projections (${SECONDS} s)"
  timeout 80 python3 scripts/projection_concat_probe.py --out "$OUT/concat.json" 2>&1 | tail -16
  echo "== tests (${SECONDS} s)"
  run_tests adamw 50 tests/ops/test_adamw.py tests/ops/test_device_guard.py
  collect_tests adamw
  rm -f "$OUT"/*/e2e.png
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
