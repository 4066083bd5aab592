#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment: torch==2.13.0 first (a CPU build; a bare
# `torch` requirement would pull a multi-GB CUDA build), then moe-orch with its worker and dev extras.
# Idempotent and quick when nothing changed. Usage: source-free, `bash scripts/setup.sh`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MOE_ORCH_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.moe-orch-setup"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "setup: installing python3-venv (Debian)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U pip
"${pip[@]}" install "torch==2.13.0"
# NOTE: deepspeed ships an sdist; without build isolation it sees the torch above and compiles nothing.
"${pip[@]}" install --no-build-isolation "deepspeed==0.19.8"
"${pip[@]}" install -e "$root[worker,dev]"
echo "$want" > "$stamp"
