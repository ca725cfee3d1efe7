#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU (and without a CUDA build of torch):
#  - every csrc/cuda/*.cu with `nvcc -c -arch=sm_90` (they include no torch headers), with the half/bfloat16
#    macros torch's CUDAExtension passes, so code that compiles here compiles in the real build;
#  - csrc/cuda/registration.cpp with `c++ -fsyntax-only` against torch's headers (c10/cuda headers ship with
#    the CPU wheel too), when torch is importable.
# Skips (exit 0) with a message when nvcc is not found. Usage: csrc/check_cuda.sh [extra nvcc flags...]
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda.sh: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
# CUDA headers for the host-compiler check: CUDA_HOME, else /usr/local/cuda, else next to nvcc (which may be a
# wrapper script elsewhere).
CUDA_ROOT="${CUDA_HOME:-${CUDA_PATH:-}}"
if [[ -z "$CUDA_ROOT" || ! -f "$CUDA_ROOT/include/cuda_runtime.h" ]]; then
  CUDA_ROOT=/usr/local/cuda
  [[ -f "$CUDA_ROOT/include/cuda_runtime.h" ]] || CUDA_ROOT="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)"
fi

TORCH_MACROS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
              -D__CUDA_NO_HALF2_OPERATORS__)
# The checks run concurrently (each is single-threaded); their logs print in order afterwards.
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
pids=()
names=()
for src in csrc/cuda/*.cu; do
  names+=("nvcc -c -arch=sm_90 $src")
  "$NVCC" -c -arch=sm_90 -std=c++17 -O3 --use_fast_math -Werror all-warnings "${TORCH_MACROS[@]}" "$@" \
    -o /dev/null "$src" >"$logs/${#pids[@]}" 2>&1 &
  pids+=($!)
done

if python3 -c "import torch" 2>/dev/null; then
  mapfile -t includes < <(python3 -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
  # CPU wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h; a stub stands in for the syntax check.
  stub="$logs/stub"
  mkdir -p "$stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
  inc_flags=()
  for p in "${includes[@]}"; do inc_flags+=(-I "$p"); done
  inc_flags+=(-idirafter "$stub")
  names+=("c++ -fsyntax-only csrc/cuda/registration.cpp")
  "${CXX:-c++}" -fsyntax-only -std=c++20 -Wall -Wextra -Wno-unused-parameter "${inc_flags[@]}" \
    -I "$CUDA_ROOT/include" -I "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
    -DT2T_FAST_WITH_CUDA=1 csrc/cuda/registration.cpp >"$logs/${#pids[@]}" 2>&1 &
  pids+=($!)
else
  echo "check_cuda.sh: torch not importable; skipping csrc/cuda/registration.cpp"
fi

status=0
for n in "${!pids[@]}"; do
  echo "${names[$n]}"
  if ! wait "${pids[$n]}"; then
    status=1
  fi
  cat "$logs/$n"
done

if [[ $status -ne 0 ]]; then
  echo "check_cuda.sh: FAILED"
else
  echo "check_cuda.sh: all CUDA sources compile"
fi
exit $status
