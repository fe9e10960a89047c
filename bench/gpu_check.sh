#!/usr/bin/env bash
# The GPU check (see bench/gpu_check.py): on one H100/H200, within 7 minutes, the CUDA extension
# build, every GPU kernel against its reference at real sizes, then every benchmark; each step in
# its own process with its own time limit. Results: gpu-check-<date>-<gpu>-<commit>.{md,json,logs.tar.gz}
# in $OUT (the device tool) or bench/results/, rewritten after every step.
#   bash bench/gpu_check.sh            run it
#   bash bench/gpu_check.sh --dry-run  print the plan and its total budget (fails over 420 s)
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1   # compiled Triton, never the interpreter the CPU tests use
# The CUDA toolkit as nvcc itself reports it: `nvcc` on PATH may be a wrapper script (so its own path says
# nothing), and torch's guess (/usr/local/cuda) may not exist; without CUDA_HOME the extension would build
# CPU-only.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  here=$(cd /tmp && nvcc -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
  [ -n "$here" ] && export CUDA_HOME=$(dirname "$here")
fi
exec python3 -m bench.gpu_check "$@"
