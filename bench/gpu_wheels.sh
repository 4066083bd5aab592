#!/usr/bin/env bash
# Build (here, with network) the wheels that bench/gpu.sh installs on the GPU machine (no network).
#
#   bash bench/gpu_wheels.sh          # -> bench/wheels/*.whl (not committed: see bench/README.md)
#
# The device image has torch, transformers, tokenizers, safetensors, typer, rich, jinja2, pyyaml,
# numpy, psutil, py-cpuinfo, msgpack, ninja, einops, nvidia-ml-py, cloudpickle, pytest and
# tensorboard (the device image's package list; the GPU tests need nothing more) but not:
# deepspeed, submitit, this package, pydantic (+ its
# compiled core, annotated-types, typing-inspection), hjson (a deepspeed dependency) and xxhash
# (checkpoint manifests); typing-extensions is carried too, as the image's may be older than
# pydantic needs. Pure-Python wheels are built from the versions in this venv; pydantic-core and
# xxhash are compiled, so they are downloaded as manylinux wheels for the device's Python (3.12,
# x86_64), at this venv's versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=bench/wheels
DEVICE_PY=${DEVICE_PY:-3.12}
rm -f "$OUT"/*.whl
mkdir -p "$OUT"

ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

# deepspeed is an sdist only: the wheel build compiles nothing (DS_BUILD_OPS defaults to 0).
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$OUT" \
    "deepspeed==$(ver deepspeed)" "submitit==$(ver submitit)" "hjson==$(ver hjson)" \
    "pydantic==$(ver pydantic)" "annotated-types==$(ver annotated-types)" \
    "typing-inspection==$(ver typing-inspection)" "typing-extensions==$(ver typing-extensions)"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$OUT" \
    --python-version "$DEVICE_PY" --implementation cp --abi "cp${DEVICE_PY/./}" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    "pydantic-core==$(ver pydantic-core)" "xxhash==$(ver xxhash)"
# This package (orchestrator + worker); bench/ itself travels with the working tree.
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$OUT" .

ls -l "$OUT"
du -sh "$OUT"
