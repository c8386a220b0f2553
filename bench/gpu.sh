#!/usr/bin/env bash
# The GPU half of the performance table on an NVIDIA host whose python3 has torch
# for CUDA (onnxruntime-gpu, TVM and TensorRT are used where installed, else listed as skipped).
# One model per call keeps each call short; the second appends to the first's file:
#   bash bench/gpu.sh tiny              # -> $OUT (or bench/results)/table_gpu.{json,md,png}
#   bash bench/gpu.sh base --append     # adds Base to bench/results/table_gpu.json (copied to $OUT first)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
model=${1:?usage: bench/gpu.sh tiny|base [--append] [table.py options]}
shift
out=${OUT:-bench/results}
mkdir -p "$out"
if [ "${1:-}" = --append ] && [ "$out" != bench/results ] && [ -f bench/results/table_gpu.json ]; then
  cp bench/results/table_gpu.json "$out/"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
python3 bench/table.py --device cuda --models "$model" --out "$out" "$@" 2>&1 | tee "$out/table_gpu_$model.log"
