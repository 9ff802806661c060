#!/usr/bin/env bash
# The one script run on the H200 (through the device tool), from the repository root:
#
#   bash scripts/gpu_session.sh [all|test|bench] [more options for `liger-plugins bench`, e.g. --quick]
#
# all (default): nvidia-smi; the op and loss tests on CUDA (LIGER_TEST_DEVICE=cuda); the benchmarks.
# Carried wheels in .whl/ (Liger-Kernel for the side-by-side) are installed into /tmp/site first.
# Everything lands under $OUT (./out where unset), in few files, as the device tool returns at most 8:
#   $OUT/log  $OUT/junit.xml  $OUT/bench/results.json  $OUT/bench/results.md  $OUT/bench/bench.png
# The bench gets what the tests leave of BUDGET_S seconds (default 540, inside the 600 s per command),
# through --time-limit: shapes not started by then are skipped and listed; results.json is rewritten
# after every shape, so even a killed run returns what it measured.
set -u -o pipefail

MODE=${1:-all}
[ $# -gt 0 ] && shift
case "$MODE" in
  all | test | bench) ;;
  *) echo "usage: $0 [all|test|bench] [bench options]" >&2; exit 2 ;;
esac
OUT=${OUT:-out}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

session() {
  local rc=0
  nvidia-smi
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name())" || return 1
  if [ "$MODE" != bench ]; then
    echo "== tests (tests/ops tests/losses on CUDA)"
    LIGER_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider --junitxml="$OUT/junit.xml" \
      tests/ops tests/losses || rc=1
  fi
  if [ "$MODE" != test ]; then
    local left=$((BUDGET_S - SECONDS - 40))  # leave time for the last shape, the table and the plot
    echo "== bench (time limit ${left} s)"
    python3 -m liger_plugins.cli bench --out "$OUT/bench" --plots combined --time-limit "$left" "$@" || rc=1
  fi
  echo "== done in ${SECONDS} s, exit ${rc}"
  return $rc
}

session "$@" 2>&1 | tee "$OUT/log"
