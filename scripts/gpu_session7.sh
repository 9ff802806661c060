#!/usr/bin/env bash
# Session 5's second H200 call (kind nvidia-h200, carry [".whl"]):
#   1. the core ops' anchors re-timed (DEFAULT_OPS, --quick) next to eager, compile and Liger-Kernel
#   2. the fused linear JSD op and the JSD-distillation loss (never timed on the GPU)
#   3. end to end with gradient checkpointing: Liger-Kernel and ours in one run
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  echo "== 1. core anchors"
  timeout 210 python3 -m liger_plugins.cli bench --quick --impls ours,eager,compile,liger \
    --out "$OUT/bench_core" --plots none --warmup 3 --time-limit 190 2>&1 | grep -v "^W1" | tail -45
  echo "== 2. fused linear JSD"
  timeout 110 python3 -m liger_plugins.cli bench --quick --ops fused_linear_jsd,jsd_loss --impls ours,eager,liger \
    --out "$OUT/bench_jsd" --plots none --warmup 1 --time-limit 90 2>&1 | grep -v "^W1" | tail -14
  echo "== 3. e2e checkpointed"
  timeout 130 python3 -m liger_plugins.bench_e2e --families llama --setups liger_kernel_ckpt,ours_ckpt \
    --out "$OUT/e2e_ckpt" 2>&1 | tail -8
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
