#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch (the CPU build, if no torch is installed), the build
# tools, then r1kernels itself with its C++ extension, built without isolation so that pip never
# downloads a CUDA torch into a build environment. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q "setuptools>=61" wheel ninja
"$PY" -m pip install -q --no-build-isolation -e ".[test,bench]"
"$PY" -c "import r1kernels, r1kernels.backends as b; print('r1kernels', r1kernels.__version__, '| C++ extension:', b.extension_available())"
