"""The whole product once, with a real model: `llm` inside an ephemeral guest
(an image carrying opencode, Claude Code and llm), against SmolLM2 served on
the host by `vmctl serve`, through the model-only network.

One test that asserts on everything that crosses a boundary: the small
context is said once, the guest's request reaches the gateway (audited as the
guest's, through its sidecar), the reply reaches the client, the guest's
connections are in its event log, and nothing of the guest is left
afterwards. The agents' tool loops are proven with a scripted stand-in
(tests/test_e2e_agents.py): a 135M model cannot drive them reliably.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import ServedModel, vmctl_cmd

pytestmark = [pytest.mark.slow, pytest.mark.qemu, pytest.mark.llama]


def test_llm_in_guest_against_vmctl_serve(
    vmctl_server: ServedModel, qemu_bin: Path, tmp_path: Path
) -> None:
    env = vmctl_server.env()
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "hello.txt").write_text("hello from the host\n")
    name = "e2e"
    up = subprocess.run(
        vmctl_cmd(
            "up", "-d", str(ws), "--ephemeral", "--detach", "--name", name, "--image", "micro",
            "--with", "opencode", "--with", "claude", "--with", "codex", "--with", "llm",
            "--net", "model",
            "--model-endpoint", f"127.0.0.1:{vmctl_server.port}", "--json",
        ),
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    # SmolLM2's 8k context is too small for the agents' tools: said once, with the fix.
    notice = [line for line in up.stderr.splitlines() if "without tools" in line]
    assert len(notice) == 1 and "vmctl serve" in notice[0], up.stderr
    status = subprocess.run(
        vmctl_cmd("status", name, "--json"), env=env, capture_output=True, text=True, timeout=60
    )
    assert json.loads(status.stdout)["notices"] == [notice[0].removeprefix("warning: ")]
    before = len(vmctl_server.audit_lines())
    try:
        run = subprocess.run(
            # llm takes a reply cap (opencode asks for thousands of tokens, which
            # SmolLM2 under TCG's CPU contention turns into many minutes).
            vmctl_cmd("exec", name, "--", "llm", "-o", "max_tokens", "32", "Reply: hello"),
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.strip(), "llm printed no reply"
        requests = [
            r
            for r in vmctl_server.audit_lines()[before:]
            if r.get("path") == "/v1/chat/completions"
        ]
        assert requests and all(r["status"] == 200 for r in requests)
        assert all(r["model"] == vmctl_server.alias for r in requests)
        assert all((r["who_kind"], r["who"]) == ("guest", name) for r in requests)
    finally:
        subprocess.run(vmctl_cmd("down", name), env=env, timeout=120, check=False)
    assert not (Path(env["VMCTL_HOME"]) / "instances" / name).exists()
    # The guest's lines outlive it (until `vmctl rm`): its connections, through its sidecar.
    guest = Path(env["VMCTL_HOME"]) / "events" / f"guest-{name}.jsonl"
    lines = [json.loads(x) for x in guest.read_text().splitlines()]
    conns = [x for x in lines if x["kind"] == "connection"]
    assert conns and all(x["port"] == vmctl_server.port for x in conns)
    assert (ws / "hello.txt").read_text() == "hello from the host\n"
