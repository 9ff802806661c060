#!/usr/bin/env bash
# One H200 call that re-checks the core kernels after tuning (CUDA parity + compile tests), re-times the
# anchor shapes, and measures torch.compile end to end. Each part has its own time box so the call ends
# inside the device tool's 600 s; everything lands under $OUT.
set -u -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
{
  echo "== CUDA parity: core ops + compile"
  LIGER_TEST_DEVICE=cuda timeout 230 python3 -m pytest -q -x -p no:cacheprovider \
    tests/ops/test_rms_norm.py tests/ops/test_fused_add_rms_norm.py tests/ops/test_layer_norm.py \
    tests/ops/test_rope.py tests/ops/test_glu.py tests/ops/test_cross_entropy.py \
    tests/ops/test_fused_linear_cross_entropy.py tests/test_compile.py 2>&1 | tail -25
  echo "== bench (anchor shapes)"
  timeout 150 python3 -m liger_plugins.cli bench --quick --ops rms_norm,fused_add_rms_norm,layer_norm,rope,cross_entropy \
    --out "$OUT/bench" --plots combined --time-limit 120 2>&1 | tail -30
  echo "== e2e with torch.compile"
  timeout 170 python3 -m liger_plugins.bench_e2e --families llama --setups hf_compile,ours_compile --out "$OUT/e2e_compile"
  echo "== done in ${SECONDS} s"
} 2>&1 | tee "$OUT/log"
