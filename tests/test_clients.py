"""`vmctl run`: real clients against a real model, and escapes that must fail.

The escape probe runs as the client binary (`--client-bin`) under each
client's own profile, so each profile is tested as `vmctl run` applies it,
bridge included. The model tests run the real llm, opencode and Claude Code
against SmolLM2 served by `vmctl serve` and read the gateway's audit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import (
    KEYED_SERVER_KEY,
    HttpStub,
    ServedModel,
    StubFactory,
    StubRequest,
    free_port,
    need,
)
from vmctl.clients import registry as clients

SECRET = "AKIA-vmctl-canary-secret"
PY = os.path.realpath(sys.executable)


def vmctl_run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    base = {**(env or os.environ), "AWS_SECRET_ACCESS_KEY": SECRET, "VMCTL_QUIET": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vmctl", "run", *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _openai(req: StubRequest) -> tuple[int, bytes]:
    """A fake OpenAI endpoint: /health and /v1/models."""
    if req.path.startswith("/v1/models"):
        return 200, json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode()
    return 200, b'{"status":"ok"}'


@pytest.fixture
def endpoint(http_stub: StubFactory) -> HttpStub:
    return http_stub(_openai)


@pytest.fixture
def other_listener() -> Iterator[tuple[int, list[object]]]:
    """A host port that is not the endpoint; records every connection it gets."""
    accepted: list[object] = []
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)

    def loop() -> None:
        while True:
            try:
                conn, peer = s.accept()
            except OSError:
                return
            accepted.append(peer)
            conn.close()

    threading.Thread(target=loop, daemon=True).start()
    try:
        yield s.getsockname()[1], accepted
    finally:
        s.close()


@pytest.fixture
def home_canary() -> Iterator[Path]:
    path = Path.home() / f".vmctl-canary-{uuid.uuid4().hex[:8]}"
    path.write_text("canary")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


PROBE = """#!{py} -IS
import json, os, socket, urllib.request
res = {{}}
def attempt(name, fn):
    try:
        fn()
        res[name] = "ok"
    except Exception as e:
        res[name] = type(e).__name__
def write(p):
    with open(p, "w") as f:
        f.write("x")
attempt("write_inside", lambda: write({inside!r}))
attempt("write_outside", lambda: write({outside!r}))
attempt("write_home", lambda: write({home_escape!r}))
attempt("read_canary", lambda: open({canary!r}).read())
attempt("endpoint", lambda: urllib.request.urlopen(
    "http://127.0.0.1:{port}/v1/models?probe=1", timeout=10).read())
attempt("other_port", lambda: socket.create_connection(("127.0.0.1", {other}), 3).close())
attempt("internet", lambda: socket.create_connection(("1.1.1.1", 80), 3).close())
res["aws"] = os.environ.get("AWS_SECRET_ACCESS_KEY")
res["home"] = os.environ.get("HOME")
print("PROBE " + json.dumps(res), flush=True)
"""


@pytest.mark.parametrize("client", ["shell", "llm", "opencode", "claude", "codex"])
def test_escapes_fail_under_each_profile(
    client: str,
    tmp_path: Path,
    workspace: Path,
    endpoint: HttpStub,
    other_listener: tuple[int, list[object]],
    home_canary: Path,
    vmctl_home: Path,
    bwrap_bin: Path,
) -> None:
    url = endpoint.url
    other, accepted = other_listener
    outside = tmp_path / "outside.txt"  # next to the workspace, on the host
    home_escape = Path.home() / f".vmctl-escape-{uuid.uuid4().hex[:8]}"
    probe = tmp_path / "tools" / "bin" / "probe"
    probe.parent.mkdir(parents=True)
    port = endpoint.port
    probe.write_text(
        PROBE.format(
            py=PY,
            inside=str(workspace / "inside.txt"),
            outside=str(outside),
            home_escape=str(home_escape),
            canary=str(home_canary),
            port=port,
            other=other,
        )
    )
    probe.chmod(0o755)
    out = vmctl_run(client, "-w", str(workspace), "--endpoint", url, "--client-bin", str(probe))
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("PROBE "))
    res = json.loads(line.removeprefix("PROBE "))
    assert res["write_inside"] == "ok" and (workspace / "inside.txt").read_text() == "x"
    # Inside, /tmp is a private tmpfs: the write may land there, never on the host.
    assert not outside.exists()
    assert res["write_home"] != "ok" and not home_escape.exists()
    assert res["read_canary"] != "ok"
    assert res["endpoint"] == "ok" and "/v1/models?probe=1" in endpoint.paths
    assert res["other_port"] != "ok" and accepted == []
    assert res["internet"] != "ok"
    assert res["aws"] is None
    state = vmctl_home / "clients" / client / "state"
    assert res["home"] == str(state)
    assert sorted(p.name for p in workspace.iterdir()) == ["inside.txt"]


def test_opencode_config_lives_in_its_state_folder(
    tmp_path: Path, workspace: Path, endpoint: HttpStub, vmctl_home: Path, bwrap_bin: Path
) -> None:
    url = endpoint.url
    out = vmctl_run(
        "opencode", "-w", str(workspace), "--endpoint", url, "--client-bin", "/bin/true"
    )
    assert out.returncode == 0, out.stderr
    config = vmctl_home / "clients" / "opencode" / "state" / "config" / "opencode"
    data = json.loads((config / "opencode.json").read_text())
    port = endpoint.port
    assert data["provider"]["llama"]["options"]["baseURL"] == f"http://127.0.0.1:{port}/v1"
    assert data["model"] == data["small_model"] == "llama/fake-model"
    assert (config / "node_modules").is_dir()
    lock = json.loads((config / "package-lock.json").read_text())
    assert lock["packages"][""]["dependencies"] == {"@opencode-ai/plugin": "1.18.33"}
    assert list(workspace.iterdir()) == []


def test_exit_status_is_the_clients(workspace: Path, endpoint: HttpStub, bwrap_bin: Path) -> None:
    url = endpoint.url
    out = vmctl_run("shell", "-w", str(workspace), "--endpoint", url, "--", "-c", "exit 7")
    assert out.returncode == 7, out.stderr


def test_unreachable_endpoint_fails_before_anything_starts(workspace: Path) -> None:
    start = time.monotonic()
    out = vmctl_run("shell", "-w", str(workspace), "--endpoint", f"http://127.0.0.1:{free_port()}",
                    "--", "-c", "touch started")  # fmt: skip
    assert out.returncode == 1
    assert "no model endpoint" in out.stderr and "vmctl serve" in out.stderr
    assert time.monotonic() - start < 20
    assert not (workspace / "started").exists()


def test_missing_client_names_the_install_step(workspace: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": "/usr/bin:/bin", "VMCTL_TOOLS": str(tmp_path / "none")}
    out = vmctl_run("opencode", "-w", str(workspace), env=env)
    assert out.returncode == 1
    assert "opencode is not installed" in out.stderr and "install-agents.sh" in out.stderr


def test_unknown_client_and_home_workspace_are_refused(workspace: Path) -> None:
    assert vmctl_run("emacs", "-w", str(workspace)).returncode == 2
    out = vmctl_run("shell", "-w", str(Path.home()))
    assert out.returncode == 2 and "refusing workspace" in out.stderr


# --- real clients against SmolLM2 served by `vmctl serve` ----------------------


def _new_audit(served: ServedModel, before: int) -> list[dict[str, object]]:
    return served.audit_lines()[before:]


def _client_or_skip(name: str) -> None:
    try:
        clients.get(name).find(None)
    except Exception:
        need(False, f"{name} not installed (scripts/install-agents.sh)")


def _run_posts(
    served: ServedModel, ws: Path, client: str, *args: str, timeout: float = 300
) -> tuple[str, list[dict[str, object]]]:
    """`vmctl run CLIENT -- ARGS` against `served` (found, not named): output, POSTs audited."""
    before = len(served.audit_lines())
    out = vmctl_run(client, "-w", str(ws), "--", *args, env=served.env(), timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(ws.iterdir()) == []
    return out.stdout, [a for a in _new_audit(served, before) if a.get("method") == "POST"]


@pytest.mark.slow
@pytest.mark.llama
def test_llm_answers_through_the_gateway(vmctl_server: ServedModel, workspace: Path) -> None:
    answer, posts = _run_posts(
        vmctl_server, workspace, "llm", "Say hello.", "-o", "max_tokens", "64"
    )
    assert answer.strip()
    assert [(a["path"], a["status"]) for a in posts] == [("/v1/chat/completions", 200)]


@pytest.mark.slow
@pytest.mark.llama
def test_opencode_run_completes_a_request(vmctl_server: ServedModel, workspace: Path) -> None:
    _client_or_skip("opencode")
    _, posts = _run_posts(vmctl_server, workspace, "opencode", "run", "Say hello.")
    assert posts and all(a["path"] == "/v1/chat/completions" for a in posts)
    assert all(a["status"] == 200 for a in posts)
    # Trimmed for an 8k model: no title request, no tool schemas.
    assert len(posts) == 1 and int(str(posts[0]["bytes_up"])) < 4096


@pytest.mark.slow
@pytest.mark.llama
def test_claude_code_reaches_the_messages_route(vmctl_server: ServedModel, workspace: Path) -> None:
    _client_or_skip("claude")
    before = len(vmctl_server.audit_lines())
    args = ["-p", "Say hello.", "--system-prompt", "You are concise.", "--tools", ""]
    out = vmctl_run("claude", "-w", str(workspace), "--", *args, env=vmctl_server.env(),
                    timeout=300)  # fmt: skip
    # A 135M model's reply may hit the output cap: Claude Code then exits 1.
    assert out.returncode in (0, 1), out.stderr[-2000:]
    posts = [a for a in _new_audit(vmctl_server, before) if a.get("method") == "POST"]
    assert posts and all(str(a["path"]).startswith("/v1/messages") for a in posts)
    assert any(a["status"] == 200 for a in posts)


@pytest.mark.slow
@pytest.mark.llama
def test_codex_answers_through_the_gateway(vmctl_server: ServedModel, workspace: Path) -> None:
    """Codex speaks only the Responses API: its streamed turn passes the gateway to llama-server."""
    _client_or_skip("codex")
    args = ["exec", "--skip-git-repo-check", "Say hello."]
    # ~4.5k prompt tokens: 30-60 s on 2 idle cores, up to 8 minutes on a crowded machine.
    answer, posts = _run_posts(vmctl_server, workspace, "codex", *args, timeout=780)
    # One turn; Codex may retry it once (stream_max_retries) on a machine too slow for it.
    assert 1 <= len(posts) <= 2
    assert all((a["path"], a["status"]) == ("/v1/responses", 200) for a in posts)
    # Codex's system prompt and tool schemas: thousands of tokens, all audited.
    assert int(str(posts[-1]["tokens_in"])) > 1000
    assert int(str(posts[-1]["tokens_out"])) > 0
    assert answer.strip()
    home = vmctl_server.home / "clients" / "codex" / "state" / "codex"
    assert 'wire_api = "responses"' in (home / "config.toml").read_text()


# --- a server with an API key: the client must be told it, and send it -------

KEY = KEYED_SERVER_KEY


@pytest.mark.slow
@pytest.mark.llama
def test_llm_sends_the_servers_api_key(keyed_server: ServedModel, workspace: Path) -> None:
    answer, posts = _run_posts(
        keyed_server, workspace, "llm", "Say hello.", "-o", "max_tokens", "64"
    )
    assert answer.strip()
    assert [(a["path"], a["status"]) for a in posts] == [("/v1/chat/completions", 200)]
    keys = keyed_server.home / "clients" / "llm" / "state" / "keys.json"
    assert json.loads(keys.read_text()) == {"vmctl": KEY}


@pytest.mark.slow
@pytest.mark.llama
def test_opencode_sends_the_servers_api_key(keyed_server: ServedModel, workspace: Path) -> None:
    _client_or_skip("opencode")
    _, posts = _run_posts(keyed_server, workspace, "opencode", "run", "Say hello.")
    assert posts and all((a["path"], a["status"]) == ("/v1/chat/completions", 200) for a in posts)
    config = keyed_server.home / "clients" / "opencode" / "state" / "config" / "opencode"
    data = json.loads((config / "opencode.json").read_text())
    assert data["provider"]["llama"]["options"]["apiKey"] == KEY
