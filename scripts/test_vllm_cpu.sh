#!/usr/bin/env bash
# The real-vLLM tests in vLLM's own CPU environment (scripts/vllm_cpu_env.sh, created on first use):
# tests/test_vllm_cpu.py (the trainer's rollout engine, its weight sync, the trainer's command line with
# vLLM in one process and in two under torchrun) and tests/test_trl_vllm.py (TRL's GRPOTrainer with vLLM
# rollouts, plain against our patches, in one process and in two under DeepSpeed ZeRO-3). Extra arguments
# go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/vllm_cpu_env.sh)
"$PY" -m pytest -q -p no:cacheprovider tests/test_vllm_cpu.py tests/test_trl_vllm.py "$@"
