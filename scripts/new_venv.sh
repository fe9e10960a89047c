# Sourced by the scripts that keep an environment of their own (vllm_cpu_env.sh, triton_env.sh,
# distributed_trl_env.sh, verl_env.sh).
# new_venv ENV WHAT [venv options...]: replace ENV by a new, empty virtual environment, refusing to touch
# a directory that one of these scripts did not make (it carries their mark).
new_venv() {
  local env=$1 what=$2
  shift 2
  if [ -e "$env" ] && [ ! -e "$env/.r1kernels-env" ]; then
    echo "$env exists and was not made by scripts/$(basename "$0"): remove it, or point the script elsewhere" >&2
    exit 1
  fi
  echo "creating $what in $env" >&2
  rm -rf "$env"
  "${PYTHON:-python3}" -m venv "$@" "$env"
  touch "$env/.r1kernels-env"
}

# DeepSpeed, for the environments that run TRL under ZeRO-3 (distributed_trl_env.sh, vllm_cpu_env.sh).
DEEPSPEED=0.19.8
# install_deepspeed ENV: built without isolation (its setup imports torch: an isolated build would fetch a
# CUDA torch) and without its ops (compiled at first use)
install_deepspeed() {
  DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$1/bin/pip" install -q --no-build-isolation "deepspeed==$DEEPSPEED" >&2
}
