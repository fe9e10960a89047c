#!/usr/bin/env bash
# Compile-checks the CUDA side of the extension with no GPU: every plain-CUDA source under csrc/cuda/ for
# Hopper (sm_90a) with nvcc, and csrc/bindings.cpp as the CUDA build compiles it (R1K_WITH_CUDA) against
# torch's headers and the toolkit's own, so that a header the GPU machine's toolkit lacks (cuBLAS, cuSPARSE)
# fails here. The bindings check needs torch installed (it runs after scripts/setup.sh in .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "error: nvcc not found on PATH; the CUDA compile check of csrc/cuda/*.cu cannot run" >&2
  exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for src in csrc/cuda/*.cu; do
  nvcc -c -std=c++20 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc/include "$src" -o "$out/$(basename "$src").o"
  echo "nvcc sm_90a ok: $src"
done
# the toolkit nvcc belongs to (nvcc on PATH may be a wrapper script elsewhere)
toolkit=$(dirname "$(cd "$out" && nvcc -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)")
torch_includes=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
# generated at torch's CUDA build, so absent from its CPU wheels; its one macro only matters for linking
mkdir -p "$out/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
g++ -std=c++20 -fsyntax-only -DR1K_WITH_CUDA -I"$out/stub" $torch_includes -I"$toolkit/include" -Icsrc/include \
  $(python3 -c "import sysconfig; print('-I' + sysconfig.get_paths()['include'])") csrc/bindings.cpp
echo "g++ ok: csrc/bindings.cpp with R1K_WITH_CUDA against the headers of $toolkit"
