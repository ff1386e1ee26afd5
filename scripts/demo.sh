#!/usr/bin/env bash
# The main job: serve the embedded model (SmolLM2-135M) in its sandbox, boot
# an ephemeral micro guest sharing this folder, and ask the model a question
# from inside the guest through the model-only network. Everything is torn
# down at the end, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
vmctl=.venv/bin/vmctl
port="${VMCTL_DEMO_PORT:-8080}"
workspace="${1:-$PWD}"

cleanup() {
  "$vmctl" down demo-vm >/dev/null 2>&1 || true
  "$vmctl" stop demo-model >/dev/null 2>&1 || true
  "$vmctl" rm demo-model >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$vmctl" serve --detach --name demo-model --port "$port"
"$vmctl" up -d "$workspace" --ephemeral --detach --name demo-vm --image micro \
  --net model --model-endpoint "127.0.0.1:$port"

echo "--- inside the guest: the injected opencode.json"
"$vmctl" exec demo-vm -- cat /home/agent/.config/opencode/opencode.json
echo "--- inside the guest: a chat request to http://10.0.2.2:8080/v1"
"$vmctl" exec demo-vm -- sh -c 'wget -qO- --header "Content-Type: application/json" \
  --post-data "{\"model\":\"smollm2-135m\",\"max_tokens\":32,\"messages\":[{\"role\":\"user\",\"content\":\"Say hello to the sandbox.\"}]}" \
  http://10.0.2.2:8080/v1/chat/completions'
echo
echo "--- the gateway's audit log"
"$vmctl" logs demo-model | tail -n 3
echo "--- the guest's network audit (one line per connection through the relay)"
"$vmctl" logs demo-vm | tail -n 2
