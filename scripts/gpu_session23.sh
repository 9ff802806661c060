#!/usr/bin/env bash
# Session 11 (carry [".whl"], ~8 min). What runs depends on the card:
#   H200 (no H200 number of this code yet): CUDA tests, e2e Llama and Qwen3 (2 rounds: Liger-Kernel, ours,
#        ours + our AdamW), the AdamW tile inside the e2e step, the glu-epilogue product probe, gap profile
#   H100: CUDA tests, the AdamW tile inside the e2e step, a profile of ours + our AdamW with what the host
#        ran during the largest GPU gaps, the glu-epilogue product probe, e2e Llama (2 rounds), the AdamW
#        step alone
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
probe() {  # scripts/glu_gemm_probe.py: the glu in the MLP products' epilogues vs cuBLAS + glu kernels
  echo "== glu epilogue probe (${SECONDS} s)"
  timeout 120 python3 scripts/glu_gemm_probe.py --out "$OUT/glu_gemm_probe.json" 2>&1 | grep -v "^W1" | tail -9
}
gap_profile() {
  echo "== profile with host gaps (${SECONDS} s)"
  timeout 90 python3 scripts/profile_e2e.py --setups ours_adamw --steps 4 --gaps --out "$OUT/profile.json" 2>&1 \
    | grep -v "^W1" | tail -30
}
e2e() {  # family, seconds
  timeout "$2" python3 -m liger_plugins.bench_e2e --families "$1" --rounds 2 --setups liger_kernel,ours,ours_adamw \
    --out "$OUT/e2e_$1" 2>&1 | grep -v "^W1" | tail -9
}
{
  nvidia-smi -L
  echo "== tests (${SECONDS} s)"
  run_tests adamw 60 tests/ops/test_adamw.py tests/ops/test_device_guard.py
  collect_tests adamw
  if nvidia-smi -L | grep -q H200; then
    echo "== e2e Llama (${SECONDS} s)"; e2e llama 160
    echo "== e2e Qwen3 (${SECONDS} s)"; e2e qwen3 160
    echo "== AdamW tile in the e2e step (${SECONDS} s)"
    timeout 110 python3 scripts/adamw_e2e_sweep.py --out "$OUT/adamw_sweep.json" 2>&1 | grep -v "^W1" | tail -6
    probe
    gap_profile
  else
    echo "== AdamW tile in the e2e step (${SECONDS} s)"
    timeout 120 python3 scripts/adamw_e2e_sweep.py --out "$OUT/adamw_sweep.json" 2>&1 | grep -v "^W1" | tail -6
    gap_profile
    probe
    echo "== e2e Llama (${SECONDS} s)"; e2e llama 150
    echo "== AdamW step alone (${SECONDS} s)"
    timeout 80 python3 scripts/bench_adamw.py --dtype bf16 --out "$OUT/adamw_bf16.json" 2>&1 | grep -v "^W1" \
      | grep -v '^ \|^{\|^}'
  fi
  rm -f "$OUT"/*/e2e.png
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
