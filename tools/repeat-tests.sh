#!/usr/bin/env bash
# Repeat pytest node ids N times each and count passes and failures: how a flaky test is proven
# fixed (issue 9: the rank that aborted at exit). Not part of CI.
# Usage: bash tools/repeat-tests.sh N NODE_ID [NODE_ID ...]
#   e.g. bash tools/repeat-tests.sh 30 \
#     tests/test_worker_e2e.py::test_usr2_on_one_rank_makes_all_ranks_save_together_and_exit_75
# Needs the venv (scripts/setup.sh) and, for SLURM tests, the localhost cluster
# (tools/slurm-local/start.sh). Failed runs' output is kept under ${OUT:-/tmp/repeat-tests}.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
n="$1"; shift
out="${OUT:-/tmp/repeat-tests}"
mkdir -p "$out"
export PATH="${MOE_ORCH_VENV:-$root/.venv}/bin:$PATH" OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu \
  TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
slurm_env="${SLURM_LOCAL_DIR:-/tmp/slurm-local}/env.sh"
# shellcheck disable=SC1090
[ -f "$slurm_env" ] && source "$slurm_env"
for test in "$@"; do
  pass=0; fail=0
  for i in $(seq 1 "$n"); do
    log="$out/$(basename "${test%%::*}" .py)-${test##*::}-$i.log"
    if python -m pytest -q -x -p no:cacheprovider "$test" >"$log" 2>&1; then
      pass=$((pass + 1)); rm -f "$log"
    else
      fail=$((fail + 1)); echo "FAIL $test (try $i): $log"
    fi
  done
  echo "$test: $pass passed, $fail failed of $n"
done
