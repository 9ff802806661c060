#!/usr/bin/env bash
# Session 6, call 1 (kind nvidia-h200, carry [".whl"]): validation left from session 5 + e2e diagnosis.
#   1. CUDA tests of what has only run under the interpreter: modulated RMSNorm, in-place-safe outputs,
#      the new GRPO loss types and cosine distillation
#   2. e2e Llama, Liger-Kernel vs ours in alternating order (2 rounds), and ours with larger fused-loss
#      chunks / the dW side stream (is the chunked loss's GEMM overhead worth memory?)
#   3. profile: ours eager vs ours + torch.compile (why is compiled + ours slower than ours eager?)
source "$(dirname "$0")/gpu_common.sh"
export PYTHONPATH=/tmp/site:$PWD
probe() {  # name, python assignments to the fused-loss knobs: one e2e run of ours with them
  timeout 120 python3 -c "
import json, liger_kernels.ops.fused_linear_cross_entropy as f
$2
from liger_plugins.bench_e2e import run_one
r = run_one('llama', 'ours', 8, 2048, 10, 3); r['setup'] = '$1'; print(json.dumps(r))" 2>&1 | grep '^{' \
  | tee -a "$OUT/probes.jsonl" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('$1', round(r['tokens_per_s']), round(r['peak_gib'],2))"
}
{
  nvidia-smi -L
  echo "== 2. e2e (${SECONDS} s)"
  timeout 200 python3 -m liger_plugins.bench_e2e --families llama --setups liger_kernel,ours --rounds 2 --out "$OUT/e2e" 2>&1 | tail -8
  probe chunk512M "f.CHUNK_BYTES = 512 * 2**20"
  probe chunk1G "f.CHUNK_BYTES = 1024 * 2**20"
  probe dwstream "f.DW_STREAM = True"
  probe ours_again ""
  echo "== 3. profile (${SECONDS} s)"
  timeout 240 python3 scripts/profile_e2e.py --setups ours,ours_compile --out "$OUT/profile.json" 2>&1 | grep -v "^W1"
  echo "== 1. CUDA tests"
  run_tests modrms 90 tests/ops/test_modulated_rms_norm.py
  run_tests inplace 60 tests/ops/test_inplace_outputs.py
  run_tests losses 90 tests/losses/test_kto_grpo.py tests/losses/test_distillation.py
  collect_tests modrms inplace losses
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
