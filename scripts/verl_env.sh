#!/usr/bin/env bash
# verl's own environment for the verl tests (tests/test_verl.py), created once and reused; prints its
# python. verl 0.9.1 pins transformers < 5.11 (the suite's is newer), so it is a venv of its own: torch
# (the CPU build from local disk, as setup.sh installs it), verl and the transformers it admits, pytest.
# r1kernels comes from this checkout on PYTHONPATH (scripts/test_verl.sh), its C++ extension as setup.sh
# built it for the same torch.   R1K_VERL_ENV moves it.
set -euo pipefail
VERL=0.9.1
TORCH=2.13.0
ENV=${R1K_VERL_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/r1kernels/verl-$VERL}
ready() {
  "$ENV/bin/python" - "$VERL" "$TORCH" <<'PYEOF' 2>/dev/null
import importlib.metadata as md, sys
assert md.version("verl") == sys.argv[1] and md.version("torch").split("+")[0] == sys.argv[2]
import pytest  # noqa: F401
PYEOF
}
if ! ready; then
  . "$(dirname "$0")/new_venv.sh"
  new_venv "$ENV" "verl $VERL's environment for the verl tests (R1K_VERL_ENV moves it)"
  "$ENV/bin/pip" install -q "torch==$TORCH" >&2       # first and alone: verl's dependencies must not pull another
  "$ENV/bin/pip" install -q "torch==$TORCH" "verl==$VERL" "transformers>=5.5.3,<5.11,!=5.6.0" pytest >&2
fi
echo "$ENV/bin/python"
