#!/usr/bin/env bash
# A virtual environment with another Triton beside this machine's torch and the suite's packages
# (--system-site-packages), created once and reused; prints its python. Used to run the static gate
# and the Triton tests under the lowest Triton the extras admit (3.6.0, the GPU machine's), whose
# interpreter needs numpy < 2.4 (it converts one-element arrays with int()).
#   bash scripts/triton_env.sh 3.6.0
set -euo pipefail
VERSION=${1:?usage: triton_env.sh VERSION}
ENV=${R1K_TRITON_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/r1kernels/triton-$VERSION}
ready() { "$ENV/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$VERSION')" 2>/dev/null; }
if ! ready; then
  . "$(dirname "$0")/new_venv.sh"
  new_venv "$ENV" "an environment with triton $VERSION (R1K_TRITON_ENV moves it)" --system-site-packages
  "$ENV/bin/pip" install -q "triton==$VERSION" "numpy<2.4" >&2
fi
echo "$ENV/bin/python"
