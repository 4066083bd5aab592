#!/usr/bin/env bash
# The whole test suite: environment, localhost SLURM cluster, ruff, mypy, pytest.
# Usage: bash scripts/test.sh [pytest args]   (MOE_ORCH_SKIP_SLURM=1 skips starting the cluster)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
venv="${MOE_ORCH_VENV:-$root/.venv}"
export PATH="$venv/bin:$PATH" OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

started_slurm=0
if [ "${MOE_ORCH_SKIP_SLURM:-0}" != 1 ]; then
  bash tools/slurm-local/start.sh
  started_slurm=1
  # shellcheck disable=SC1091
  source "${SLURM_LOCAL_DIR:-/tmp/slurm-local}/env.sh"
fi
cleanup() { if [ "$started_slurm" = 1 ] && [ "${MOE_ORCH_KEEP_SLURM:-0}" != 1 ]; then bash tools/slurm-local/stop.sh || true; fi; }
trap cleanup EXIT

echo "== ruff"; ruff check .
echo "== mypy"; mypy orchestrator worker bench tests
echo "== pytest"; python -m pytest -q "$@"
