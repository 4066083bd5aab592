#!/usr/bin/env bash
# The GPU check and benchmark, prepared for one H200 machine with NO network, about 10 minutes:
# 1. the GPU tests (`pytest -m gpu`, tests/test_gpu.py, 200 s cap): bf16 training of the tiny MoE
#    over NCCL, one rank per GPU, its checkpoints, a bitwise resume and the Hugging Face export;
# 2. the benchmark: bf16 training of a ~0.9B-parameter MoE (8 experts, top-2, ep_size 1) with our
#    dropless layer and with the stock DeepSpeed MoE layer, against its dense parent: tokens/s and
#    MFU (989 TFLOP/s), each variant in its own process (80 s cap each), torch's fused AdamW as the
#    worker builds it; then, for dense and dropless (40 s more each), one checkpoint of the trained
#    state on the GPU through the worker's paths, in a run dir under $TMPDIR (or /tmp), deleted
#    afterwards: the synchronous save's MB/s vs `dd conv=fsync` of the same bytes in the same
#    folder, the background save's (training.async_save) stall vs the synchronous save, and the
#    verified load (resume) vs `cat` of the files (rows `gpu checkpoint save|async stall|load`);
# 3. the MoE layers alone in bf16 (`bench.moe_layer --device cuda`, 60 s cap): dropless vs stock
#    (and stock without dropping, and the dense FFN of equal FLOPs), top-1 and top-2, 4k-64k tokens.
#
#   bash bench/gpu_wheels.sh     # here, beforehand: bench/wheels/*.whl (deepspeed, submitit, ...)
#   bash bench/gpu.sh            # there, from the repository root (the wheels travel with it)
#   bash bench/gpu.sh --tests    # there: the GPU tests only
#   bash bench/gpu.sh --dry      # here: the benchmark's steps on CPU with a tiny shape (no install)
#
# Installs the wheels with --no-index --no-deps into a private folder (the image's packages, pytest
# among them, are left alone), checks the imports, runs the tests (log: $OUT/gpu-tests.log) and
# `python -m bench.gpu_train` and `python -m bench.moe_layer --device cuda --dtype bf16`, and copies
# bench/results/<date>-gpu-train.{json,md} and <date>-gpu-moe-layer.{json,md} to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
DRY=0
TESTS_ONLY=0
[ "${1:-}" = "--dry" ] && DRY=1
[ "${1:-}" = "--tests" ] && TESTS_ONLY=1

if [ "$DRY" = 1 ]; then
    PY=${PY:-.venv/bin/python}
    export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
    exec "$PY" -m bench.gpu_train --dry
fi

PY=${PY:-python3}
SITE=${SITE:-/tmp/moe-orch-site}
shopt -s nullglob
wheels=(bench/wheels/*.whl)
if [ "${#wheels[@]}" -eq 0 ]; then
    echo "error: no wheels in bench/wheels: run bash bench/gpu_wheels.sh on a machine with network first" >&2
    echo "       (and carry bench/wheels to this machine)" >&2
    exit 2
fi
echo "== $(date -u +%FT%TZ) installing ${#wheels[@]} wheels into $SITE"
"$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "${wheels[@]}"
# NOTE: the repository root first (bench/, and the same orchestrator/worker as the wheel), then SITE.
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=8

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PY" - <<'EOF'
import importlib.metadata as m
import torch
for name in ("torch", "transformers", "deepspeed", "pydantic", "submitit", "moe-orch"):
    print(f"{name} {m.version(name)}")
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
import deepspeed, deepspeed.moe.layer  # noqa: E401,F401
import orchestrator.spec.schema, worker.model, worker.moe_dropless  # noqa: E401,F401
print("imports ok")
EOF

echo "== $(date -u +%FT%TZ) GPU tests (pytest -m gpu)"
rc=0
LOG=${OUT:-/tmp}/gpu-tests.log
# NOTE: DS_ACCELERATOR must not say cpu here; -p no:cacheprovider writes nothing into the tree.
env -u DS_ACCELERATOR PYTHONUNBUFFERED=1 timeout 200 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider \
    tests/test_gpu.py 2>&1 | tee "$LOG" || rc=$?
[ "$TESTS_ONLY" = 1 ] && { echo "== done in $(( $(date +%s) - START )) s (rc $rc)"; exit $rc; }

echo "== $(date -u +%FT%TZ) training (dense, stock, dropless) and checkpoints (dense, dropless)"
"$PY" -m bench.gpu_train --timeout 80 --ckpt-timeout 40 ${OUT:+--out "$OUT"} || rc=$?

echo "== $(date -u +%FT%TZ) MoE layers (bf16: dropless, stock, stock-nodrop, dense)"
env -u DS_ACCELERATOR timeout 60 "$PY" -m bench.moe_layer --device cuda --dtype bf16 \
    --tokens 4096 16384 65536 --repeats 10 ${OUT:+--out "$OUT"} || rc=$?
echo "== done in $(( $(date +%s) - START )) s (rc $rc)"
exit $rc
