#!/usr/bin/env bash
# The GPU check (see bench/gpu_check.py): on one H100/H200, within 7 minutes, the CUDA extension
# build, every GPU kernel against its reference at real sizes, then every benchmark; each step in
# its own process with its own time limit. Results: gpu-check-<date>-<gpu>-<commit>.{md,json,logs.tar.gz}
# in $OUT (the device tool) or bench/results/.
#   bash bench/gpu_check.sh            run it
#   bash bench/gpu_check.sh --dry-run  print the plan and its total budget (fails over 420 s)
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1   # compiled Triton, never the interpreter the CPU tests use
exec python3 -m bench.gpu_check "$@"
