#!/usr/bin/env bash
# On a GPU machine: build the extension with its CUDA kernels, run the GPU tests and every
# benchmark, and leave all results in one folder (default bench/results/<date>-<gpu>-<commit>,
# or $OUT when set, as on the device tool). Sized to finish inside 10 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
dest=${OUT:-bench/results/$(date -u +%Y-%m-%d)-${gpu:-gpu}-$(git rev-parse --short HEAD 2>/dev/null || echo nogit)}
mkdir -p "$dest"
export PYTHONUNBUFFERED=1 R1K_BENCH_OUT="$dest"
{
  echo "date: $(date -u)"; nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$dest/env.txt" 2>&1
MAX_JOBS=16 timeout 240 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$dest/build.log" 2>&1 \
  || echo "extension build failed: see build.log (the cuda backend will be skipped)"
timeout 180 python3 -m pytest -q -m cuda tests 2>&1 | tee "$dest/gpu_tests.log" | tail -5
timeout 300 python3 -m bench all --device cuda 2>&1 | tee "$dest/bench.log" | tail -60
echo "results in $dest"
