#!/usr/bin/env bash
# The real-vLLM tests (tests/test_vllm_cpu.py) in vLLM's own CPU environment (scripts/vllm_cpu_env.sh,
# created on first use): the rollout engine, its weight sync, the trainer's command line with vLLM in
# one process and in two under torchrun. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/vllm_cpu_env.sh)
"$PY" -m pytest -q -p no:cacheprovider tests/test_vllm_cpu.py "$@"
