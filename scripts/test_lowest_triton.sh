#!/usr/bin/env bash
# The tests that run Triton kernels, under the lowest Triton the extras admit, 3.6.0 (the GPU machine's),
# whose interpreter differs from the newest's: the suite runs them under the newest and records which
# they are (tests/conftest.py, --triton-tests; with no record, every test runs). The 3.6.0 static-gate
# report is checked by the suite (by its inputs' hash), not regenerated here. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/triton_env.sh 3.6.0)
"$PY" -m pytest -q --triton-tests --ignore=tests/test_triton_sm90.py --ignore=tests/test_vllm_cpu.py tests/ "$@"
