"""Keys follow the server: `vmctl run` and `vmctl up` against a real keyed `vmctl serve`.

The user never types the key of a vmctl server: both verbs read it from
the server's private state. A 401 from any other endpoint is one line that
says a key is needed (or was refused) and how to pass one. With two servers
running, `--server NAME` chooses, and without it both verbs say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import (
    KEYED_SERVER_KEY,
    ServedModel,
    need,
    start_server,
    stop_server,
    vmctl_cmd,
)

pytestmark = [pytest.mark.llama, pytest.mark.slow]
KEY = KEYED_SERVER_KEY
Run = subprocess.CompletedProcess[str]


def vmctl(env: dict[str, str], *args: str, timeout: float = 300) -> Run:
    return subprocess.run(
        vmctl_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def one_error_line(stderr: str) -> str:
    """The single `error:` line (a hint may follow); never a traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def posts(served: ServedModel, before: int) -> list[tuple[object, object]]:
    lines = served.audit_lines()[before:]
    return [(a["path"], a["status"]) for a in lines if a["method"] == "POST"]


def test_run_with_the_servers_url_uses_its_key(keyed_server: ServedModel, workspace: Path) -> None:
    """The reported failure: `--endpoint URL` of a keyed vmctl server, no key typed."""
    before = len(keyed_server.audit_lines())
    out = vmctl(keyed_server.env(), "run", "llm", "-w", str(workspace), "--endpoint",
                keyed_server.base_url, "--", "Say hi.", "-o", "max_tokens", "16")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert posts(keyed_server, before) == [("/v1/chat/completions", 200)]
    assert list(workspace.iterdir()) == []  # the key went to llm's private state only


def test_other_endpoints_need_a_key_and_a_wrong_one_is_one_line(
    keyed_server: ServedModel, workspace: Path, tmp_path: Path
) -> None:
    """Seen from another VMCTL_HOME the server is just an endpoint: its key must be given."""
    env = {**os.environ, "VMCTL_HOME": str(tmp_path / "elsewhere")}
    env.pop("VMCTL_API_KEY", None)
    base = ["run", "llm", "-w", str(workspace), "--endpoint", keyed_server.url]
    out = vmctl(env, *base, "--", "hi")
    assert out.returncode == 1
    assert one_error_line(out.stderr) == f"error: {keyed_server.url} needs an API key (HTTP 401)"
    assert "--api-key" in out.stderr and "VMCTL_API_KEY" in out.stderr
    out = vmctl(env, *base, "--api-key", "not-the-key", "--", "hi")
    assert out.returncode == 1
    assert one_error_line(out.stderr) == f"error: {keyed_server.url} refused the API key (HTTP 401)"
    before = len(keyed_server.audit_lines())
    out = vmctl({**env, "VMCTL_API_KEY": KEY}, *base, "--", "Say hi.", "-o", "max_tokens", "8")
    assert out.returncode == 0, out.stderr
    assert posts(keyed_server, before) == [("/v1/chat/completions", 200)]


@pytest.fixture
def second_server(keyed_server: ServedModel, llama_server_bin: Path) -> Iterator[ServedModel]:
    """A keyless server beside the keyed one, in the same VMCTL_HOME."""
    served = start_server(keyed_server.home, "open", llama_server_bin)
    try:
        yield served
    finally:
        stop_server(served)


def test_server_name_chooses_between_two(
    keyed_server: ServedModel, second_server: ServedModel, workspace: Path
) -> None:
    env = keyed_server.env()
    out = vmctl(env, "run", "llm", "-w", str(workspace), "--", "hi")
    assert out.returncode == 2
    line = one_error_line(out.stderr)
    assert "2 vmctl servers are running" in line and f"k ({keyed_server.url})" in line
    assert f"open ({second_server.url})" in line and "--server NAME" in out.stderr
    before_k, before_open = len(keyed_server.audit_lines()), len(second_server.audit_lines())
    out = vmctl(env, "run", "llm", "-w", str(workspace), "--server", "k",
                "--", "Say hi.", "-o", "max_tokens", "8")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert posts(keyed_server, before_k) == [("/v1/chat/completions", 200)]
    assert posts(second_server, before_open) == []
    out = vmctl(env, "run", "llm", "-w", str(workspace), "--server", "nope", "--", "hi")
    assert "no running vmctl server named 'nope'" in one_error_line(out.stderr)


# --- `vmctl up`: the guest gets the server's key through fw_cfg -------------------


def micro_manifest(env: dict[str, str]) -> str:
    """The micro image (built once, cached under the shared VMCTL_CACHE)."""
    need(sys.platform.startswith("linux"), "QEMU guests run on Linux here")
    code = "from vmctl.images import choose; print(choose.resolve_image('micro').path)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    need(out.returncode == 0, f"micro image: {out.stderr[-500:]}")
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.qemu
def test_up_reaches_the_keyed_server_without_a_typed_key(
    keyed_server: ServedModel, workspace: Path, qemu_bin: Path
) -> None:
    env = keyed_server.env()
    env.pop("VMCTL_API_KEY", None)
    env["VMCTL_CACHE"] = os.environ.get("VMCTL_CACHE") or str(Path.home() / ".cache" / "vmctl")
    manifest = micro_manifest(env)
    # TCG: what is tested is the key's way into the guest, not the accelerator
    # (a KVM verdict cached while the host was idle can outlive its truth).
    up = vmctl(env, "up", "-d", str(workspace), "--name", "keyed", "--image", manifest,
               "--accel", "tcg", "--detach", "--timeout", "240", timeout=420)  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        # Busybox wget, with the key and URL the injected env file holds.
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        script = (
            'wget -q -O - --header "Authorization: Bearer $OPENAI_API_KEY" '
            '--header "Content-Type: application/json" '
            f"--post-data '{body}' \"$OPENAI_BASE_URL/chat/completions\""
        )
        before = len(keyed_server.audit_lines())
        out = vmctl(env, "exec", "keyed", "--", "sh", "-c", script, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout)["choices"]
        assert posts(keyed_server, before) == [("/v1/chat/completions", 200)]
        assert list(workspace.iterdir()) == []  # nothing written into the workspace
    finally:
        vmctl(env, "down", "keyed", timeout=120)
