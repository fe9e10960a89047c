#!/usr/bin/env bash
# The static gate's report for every Triton whose report is committed: the installed one (the newest
# the extras admit, in the suite's environment) and 3.6.0 (the lowest, the GPU machine's), each in
# bench/results/sm90-static-triton<version>.{json,md}. Extra arguments go to the gate.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
python3 scripts/check_triton_sm90.py "$@"
"$(bash scripts/triton_env.sh 3.6.0)" scripts/check_triton_sm90.py "$@"
