#!/usr/bin/env bash
# Compile-checks every plain-CUDA source under csrc/cuda/ for Hopper (sm_90a) with nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "error: nvcc not found on PATH; the CUDA compile check of csrc/cuda/*.cu cannot run" >&2
  exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for src in csrc/cuda/*.cu; do
  nvcc -c -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc/include "$src" -o "$out/$(basename "$src").o"
  echo "nvcc sm_90a ok: $src"
done
