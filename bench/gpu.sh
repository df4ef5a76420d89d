#!/usr/bin/env bash
# The GPU benchmark in one command, for a machine with one NVIDIA GPU (not run in CI):
#   bench/gpu.sh            # writes bench/results/gpu-*.json and prints the tables
# Model alone at batch 1/32/256 per precision, then HTTP at 64 and 256 clients against the predictor
# (fp16, CUDA graphs per batch bucket, max batch 256) with 1 and 2 worker processes, with the load
# generator on the same machine. Results go in the README's GPU table with the device name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for batch in 32 256; do
  $PY bench/run.py --device cuda --batch "$batch" --precisions fp16 bf16 fp32:eager --concurrency 64 256 --seconds 10 \
    --server-args --device cuda --max_batch_size "$batch" --decode_threads 8 --out "bench/results/gpu-batch$batch"
done
for workers in 2; do
  $PY bench/run.py --device cuda --batch 256 --precisions fp16 --concurrency 64 256 --seconds 10 \
    --server-args --device cuda --max_batch_size 256 --decode_threads 8 --workers "$workers" \
    --out "bench/results/gpu-workers$workers"
done
