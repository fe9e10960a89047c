#!/usr/bin/env bash
# The verl tests (tests/test_verl.py): verl 0.9.1's real FSDP2 engine on CPU with our fused log-probs,
# policy losses, advantage estimators and attention, in verl's own environment (scripts/verl_env.sh,
# created on first use), with r1kernels from this checkout. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/verl_env.sh)
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -p no:cacheprovider tests/test_verl.py "$@"
