# Sourced by scripts/gpu_session*.sh on the H200: output folder, carried wheels, a per-file CUDA test runner.
set -u -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl

run_tests() {  # name, seconds, pytest args...: one timeout per file, the log in $OUT/t_<name>.log
  local name=$1 secs=$2; shift 2
  LIGER_TEST_DEVICE=cuda PYTHONPATH=$PWD timeout "$secs" python3 -m pytest -q -p no:cacheprovider -rf --tb=short "$@" \
    > "$OUT/t_$name.log" 2>&1
  echo "$name rc=$? $(tail -1 "$OUT/t_$name.log")"
}

collect_tests() {  # names...: the run_tests logs of those names into $OUT/cuda_tests.log; print the failures
  local name
  for name in "$@"; do echo "#### $name"; cat "$OUT/t_$name.log"; rm -f "$OUT/t_$name.log"; done > "$OUT/cuda_tests.log"
  grep -E "^FAILED|^ERROR" "$OUT/cuda_tests.log" | head -30
}
