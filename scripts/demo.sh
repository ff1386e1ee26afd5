#!/usr/bin/env bash
# The main job: an agent inside an ephemeral micro guest changes files of a
# workspace through its tools, the change shows on the host, and every model
# request is in vmctl's audit.
#
# The model is a scripted stand-in (tests/fakes/scripted_model.py), because
# the embedded SmolLM2-135M cannot call tools reliably: the stand-in answers
# with a fixed sequence of tool calls (read, edit, write a new file, run a
# shell command). The agent, its injected configuration, the guest, the
# model-only network and the audit are all real. Then SmolLM2 itself answers
# one plain question from inside the same guest, served by `vmctl serve`.
#
#   scripts/demo.sh [WORKSPACE]      (default: a fresh temporary folder)
#   VMCTL_DEMO_AGENT=opencode        (default claude: faster under TCG)
#   VMCTL_DEMO_ACCEL=tcg             (default auto)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
vmctl=$root/.venv/bin/vmctl
python=$root/.venv/bin/python
agent="${VMCTL_DEMO_AGENT:-claude}"
port="${VMCTL_DEMO_PORT:-8080}"
accel="${VMCTL_DEMO_ACCEL:-auto}"
workspace="${1:-$(mktemp -d /tmp/vmctl-demo.XXXXXX)}"
runtime=$(mktemp -d /tmp/vmctl-demo-run.XXXXXX)
stand_in_pid=

cleanup() {
  "$vmctl" down demo-vm >/dev/null 2>&1 || true
  "$vmctl" stop demo-model >/dev/null 2>&1 || true
  "$vmctl" rm demo-model >/dev/null 2>&1 || true
  [[ -n $stand_in_pid ]] && kill "$stand_in_pid" 2>/dev/null || true
  rm -rf "$runtime"
}
trap cleanup EXIT

case $agent in
  claude) ask=(claude -p "Do the job described in notes.txt.") ;;
  opencode) ask=(opencode run "Do the job described in notes.txt.") ;;
  *) echo "VMCTL_DEMO_AGENT must be claude or opencode" >&2; exit 2 ;;
esac

echo "=== NOTE: the model driving the agent is a SCRIPTED STAND-IN, not SmolLM2."
echo "    SmolLM2-135M (the embedded model) cannot call tools reliably, so"
echo "    tests/fakes/scripted_model.py answers with fixed tool calls: read notes.txt,"
echo "    edit it, write made/by-agent/hello.py, run a shell command. Everything else is real."
echo "    For a real model: vmctl serve qwen3.5-35b-a3b, then vmctl up ... --with $agent."
echo

# A previous demo's guest lines outlive it (events stay until `vmctl rm`): start afresh.
"$vmctl" rm demo-vm >/dev/null 2>&1 || true

mkdir -p "$workspace"
printf '# notes\nstatus: draft\n' >"$workspace/notes.txt"
echo "--- on the host, before: $workspace"
(cd "$workspace" && find . -type f | sort && cat notes.txt)

coproc STAND_IN { PYTHONPATH=$root/tests exec "$python" -m fakes.scripted_model \
  --root /workspace --log "$runtime/stand-in.jsonl"; }
stand_in_pid=$STAND_IN_PID
read -r _ stand_in_port <&"${STAND_IN[0]}"

"$vmctl" up -d "$workspace" --ephemeral --detach --name demo-vm --image micro --accel "$accel" \
  --with opencode --with claude --with codex --with llm --net model --model-endpoint "127.0.0.1:$stand_in_port"

echo "--- inside the guest: $agent, as the agent user, in /workspace"
"$vmctl" exec demo-vm -- "${ask[@]}"

echo "--- on the host, after"
(cd "$workspace" && find . -type f | sort && cat notes.txt && cat made/by-agent/answer.txt)
echo "--- the guest's audit: its lifecycle, and one line per model request through its sidecar"
"$vmctl" logs demo-vm
echo "--- what the stand-in answered (one line per request)"
cat "$runtime/stand-in.jsonl" | cut -c1-160
"$vmctl" down demo-vm

echo
echo "=== SmolLM2 itself, served by vmctl serve, answers one question from a guest (no tools)"
"$vmctl" serve --detach --name demo-model --port "$port"
"$vmctl" up -d "$workspace" --ephemeral --detach --name demo-vm --image micro --accel "$accel" \
  --with opencode --with claude --with codex --with llm --net model --model-endpoint "127.0.0.1:$port"
"$vmctl" exec demo-vm -- llm "Say hello to the sandbox."
echo "--- the gateway's audit log"
"$vmctl" logs demo-model | tail -n 3
