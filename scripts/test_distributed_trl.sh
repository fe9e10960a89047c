#!/usr/bin/env bash
# The distributed TRL tests (tests/test_trl_distributed.py): TRL's GRPOTrainer in two processes under
# DeepSpeed ZeRO-3 and FSDP2 (accelerate 1.13 and the newest), in the environment of
# scripts/distributed_trl_env.sh (created on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/distributed_trl_env.sh)
export R1K_OLD_ACCELERATE
R1K_OLD_ACCELERATE="$(dirname "$(dirname "$PY")")/accelerate-1.13.0"
"$PY" -m pytest -q -p no:cacheprovider tests/test_trl_distributed.py "$@"
