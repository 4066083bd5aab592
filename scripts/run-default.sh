#!/usr/bin/env bash
# The default job: a tiny MoE (4 experts, 2 ranks, expert parallelism 2) trained on CPU through
# submitit's local executor, on the sample data shipped with moe-orch.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
export OMP_NUM_THREADS=1
exec "${MOE_ORCH_VENV:-$root/.venv}/bin/moe-orch" submit "$root/configs/tiny-cpu.yaml" --wait "$@"
