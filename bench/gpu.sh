#!/usr/bin/env bash
# The GPU benchmark in one command, for a machine with one NVIDIA GPU (not run in CI):
#   bench/gpu.sh [OUT_DIR]      # default bench/results; writes OUT_DIR/gpu.json and a log
# What it measures and in which order: bench/gpu.py's docstring. `bench/gpu.py --device cpu` dry-runs
# the same code paths on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${1:-bench/results}
mkdir -p "$OUT_DIR"
nvidia-smi
PYTHONUNBUFFERED=1 $PY bench/gpu.py --out "$OUT_DIR" "${@:2}" 2>&1 | tee "$OUT_DIR/gpu.log"
