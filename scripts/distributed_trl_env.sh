#!/usr/bin/env bash
# An environment for the distributed TRL tests (tests/test_trl_distributed.py), created once and reused;
# prints its python. It sees the suite's packages (--system-site-packages: torch, TRL, transformers, the
# newest accelerate, r1kernels) and adds DeepSpeed, kept out of the suite's environment, and accelerate 1.13
# in a folder of its own (pip --target, no dependencies), which the tests put first on PYTHONPATH for the
# FSDP2 runs under the oldest accelerate line TRL 1.16 admits that wraps lm_head in the root unit.
# DeepSpeed is built without isolation (its setup imports torch: an isolated build would fetch a CUDA torch).
#   R1K_DISTRIBUTED_ENV moves it.
set -euo pipefail
. "$(dirname "$0")/new_venv.sh"      # DEEPSPEED, install_deepspeed, new_venv
OLD_ACCELERATE=1.13.0
ENV=${R1K_DISTRIBUTED_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/r1kernels/distributed-trl}
ready() {
  DS_ACCELERATOR=cpu "$ENV/bin/python" - "$DEEPSPEED" "$ENV/accelerate-$OLD_ACCELERATE" "$OLD_ACCELERATE" <<'PYEOF' 2>/dev/null
import importlib.metadata as md, os, sys
assert md.version("deepspeed") == sys.argv[1]
assert os.path.isfile(os.path.join(sys.argv[2], f"accelerate-{sys.argv[3]}.dist-info", "METADATA"))
PYEOF
}
if ! ready; then
  new_venv "$ENV" "DeepSpeed's environment for the distributed TRL tests (R1K_DISTRIBUTED_ENV moves it)" \
    --system-site-packages
  install_deepspeed "$ENV"
  "$ENV/bin/pip" install -q --no-deps --target "$ENV/accelerate-$OLD_ACCELERATE" "accelerate==$OLD_ACCELERATE" >&2
fi
echo "$ENV/bin/python"
