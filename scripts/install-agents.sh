#!/usr/bin/env bash
# Install the pinned agent clients (opencode, Claude Code, Codex) into vmctl's own
# npm prefix, never into the user's global npm. Idempotent: when the pinned
# versions are already there it returns at once. Prints the prefix on stdout
# (its bin/ holds `opencode`, `claude` and `codex`); progress goes to stderr.
#
#   VMCTL_TOOLS   tools folder (default ~/.cache/vmctl/tools); prefix is $VMCTL_TOOLS/npm
#   VMCTL_AGENTS  which to install (default "opencode claude codex")
set -euo pipefail

prefix="${VMCTL_TOOLS:-$HOME/.cache/vmctl/tools}/npm"
agents="${VMCTL_AGENTS:-opencode claude codex}"

installed_version() {
    # $1: package name. Prints the installed version, or nothing.
    local pj="$prefix/lib/node_modules/$1/package.json"
    [ -f "$pj" ] || return 0
    node -e 'process.stdout.write(require(process.argv[1]).version || "")' "$pj" 2>/dev/null || true
}

if ! command -v npm >/dev/null 2>&1; then
    echo "install-agents: npm not found (install Node.js 18+ first)" >&2
    exit 1
fi

# The pins live in one file, shared with the guest images (vmctl.images.micro_agents).
versions="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/orchestrator/vmctl/data/agent-versions.json"
pin() {
    node -e 'process.stdout.write(require(process.argv[1])[process.argv[2]])' "$versions" "$1"
}

mkdir -p "$prefix"
wanted=()
for agent in $agents; do
    case "$agent" in
        opencode) pkg=opencode-ai; ver=$(pin opencode) ;;
        claude) pkg=@anthropic-ai/claude-code; ver=$(pin claude) ;;
        codex) pkg=@openai/codex; ver=$(pin codex) ;;
        *) echo "install-agents: unknown agent '$agent' (opencode, claude, codex)" >&2; exit 2 ;;
    esac
    if [ "$(installed_version "$pkg")" = "$ver" ] && [ -x "$prefix/bin/$agent" ]; then
        echo "install-agents: $pkg@$ver already installed" >&2
    else
        wanted+=("$pkg@$ver")
    fi
done

if [ "${#wanted[@]}" -gt 0 ]; then
    echo "install-agents: installing ${wanted[*]} into $prefix" >&2
    # --ignore-scripts is not used: opencode and claude pick their native
    # binary in postinstall (codex has it in an optional platform package).
    # No audit/fund calls: registry traffic only.
    npm install --global --prefix "$prefix" --no-audit --no-fund --loglevel=error \
        "${wanted[@]}" >&2
fi

echo "$prefix"
