"""`vmctl serve` end to end: real llama-server, real SmolLM2, real bwrap, real SDKs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import openai
import pytest

from conftest import ServedModel, free_port, vmctl_cmd

pytestmark = pytest.mark.llama


def chat(base_url: str, model: str, prompt: str = "Say hi.", max_tokens: int = 8) -> str:
    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=120)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
    )
    return reply.choices[0].message.content or ""


def test_models_lists_the_alias_not_a_path(vmctl_server: ServedModel) -> None:
    client = openai.OpenAI(base_url=vmctl_server.base_url, api_key="unused")
    ids = [m.id for m in client.models.list()]
    assert ids == ["smollm2-135m"]


def test_openai_sdk_plain_and_streamed(vmctl_server: ServedModel) -> None:
    before = len(vmctl_server.audit_lines())
    assert chat(vmctl_server.base_url, vmctl_server.alias).strip()
    client = openai.OpenAI(base_url=vmctl_server.base_url, api_key="unused")
    stream = client.chat.completions.create(
        model=vmctl_server.alias,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=16,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 3 and "".join(pieces).strip()
    lines = vmctl_server.audit_after(before, 2)
    assert [(r["method"], r["path"], r["status"]) for r in lines] == [
        ("POST", "/v1/chat/completions", 200),
        ("POST", "/v1/chat/completions", 200),
    ]
    assert all(r["model"] == "smollm2-135m" for r in lines)
    assert all(int(str(r["tokens_out"])) > 0 for r in lines)
    assert all((r["who_kind"], r["who"]) == ("host", "local") for r in lines)


def test_anthropic_sdk_messages(vmctl_server: ServedModel) -> None:
    client = anthropic.Anthropic(base_url=vmctl_server.url, api_key="unused", timeout=120)
    reply = client.messages.create(
        model=vmctl_server.alias,
        max_tokens=16,
        messages=[{"role": "user", "content": "Say hello."}],
    )
    assert reply.content and reply.content[0].type == "text"
    last = vmctl_server.audit_lines()[-1]
    assert last["path"] == "/v1/messages" and last["status"] == 200
    before = len(vmctl_server.audit_lines())
    with client.messages.stream(
        model=vmctl_server.alias,
        max_tokens=16,
        messages=[{"role": "user", "content": "Count to three."}],
    ) as stream:
        pieces = list(stream.text_stream)
    assert len(pieces) > 1 and "".join(pieces).strip()
    (last,) = vmctl_server.audit_after(before, 1)
    assert last["path"] == "/v1/messages" and last["status"] == 200
    assert int(str(last["tokens_out"])) > 0


def test_32_concurrent_requests_none_lost(vmctl_server: ServedModel) -> None:
    before = len(vmctl_server.audit_lines())
    with ThreadPoolExecutor(max_workers=32) as pool:
        futures = [
            pool.submit(chat, vmctl_server.base_url, vmctl_server.alias, f"Number {i}?", 4)
            for i in range(32)
        ]
        results = [f.result(timeout=300) for f in futures]
    assert len(results) == 32
    lines = vmctl_server.audit_after(before, 32)
    assert len(lines) == 32
    assert all(r["status"] == 200 and r["path"] == "/v1/chat/completions" for r in lines)


def _server_pids(home: Path, name: str) -> list[int]:
    """Pids of llama-server processes started for this server (inside bwrap)."""
    meta = json.loads((home / "servers" / name / "server.json").read_text())
    root = int(meta["llama"]["pid"])
    pids, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            children = (
                (task / "children").read_text().split() if (task / "children").exists() else []
            )
            frontier += [int(c) for c in children]
    return [
        p
        for p in pids
        if Path(f"/proc/{p}/exe").exists() and "llama-server" in os.readlink(f"/proc/{p}/exe")
    ]


def test_server_is_confined_no_network_no_credentials(
    tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path, smollm2: Path
) -> None:
    """The real llama-server under bwrap: only a loopback, and a clean environment."""
    home = tmp_path_factory.mktemp("conf")
    env = {
        **os.environ,
        "VMCTL_HOME": str(home),
        "VMCTL_LLAMA_SERVER": str(llama_server_bin),
        "AWS_SECRET_ACCESS_KEY": "canary-credential",
        "HF_TOKEN": "canary-hf",
    }
    port = free_port()
    subprocess.run(
        vmctl_cmd("serve", "--detach", "--port", str(port), "--name", "conf"),
        env=env, check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    try:
        pids = _server_pids(home, "conf")
        assert pids, "llama-server process not found"
        for pid in pids:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"canary" not in environ
            interfaces = Path(f"/proc/{pid}/net/dev").read_text()
            assert [ln.split(":")[0].strip() for ln in interfaces.splitlines()[2:]] == ["lo"]
            # Its own network namespace: not the host's.
            assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    finally:
        subprocess.run(vmctl_cmd("stop", "conf"), env=env, timeout=60, check=False)
    assert not (home / "servers" / "conf" / "run").exists()


def test_api_key_enforced_on_real_server(
    tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path, smollm2: Path
) -> None:
    home = tmp_path_factory.mktemp("key")
    env = {**os.environ, "VMCTL_HOME": str(home), "VMCTL_LLAMA_SERVER": str(llama_server_bin)}
    port = free_port()
    subprocess.run(
        vmctl_cmd("serve", "--detach", "--port", str(port), "--name", "k", "--api-key", "s3cret"),
        env=env, check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        with pytest.raises(openai.AuthenticationError):
            chat(f"{base}/v1", "smollm2-135m")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret")
        assert [m.id for m in client.models.list()] == ["smollm2-135m"]
        ac = anthropic.Anthropic(base_url=base, api_key="s3cret")
        reply = ac.messages.create(
            model="smollm2-135m", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.content
        import urllib.request

        with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
            assert r.status == 200
    finally:
        subprocess.run(vmctl_cmd("stop", "k"), env=env, timeout=60, check=False)


def _one_line_error(stderr: str) -> None:
    assert "Traceback" not in stderr
    assert stderr.startswith("error: "), stderr


def test_port_in_use_is_one_line(llama_server_bin: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run(
            vmctl_cmd("serve", "--detach", "--port", str(port)),
            env={**os.environ, "VMCTL_LLAMA_SERVER": str(llama_server_bin)},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert out.returncode == 1
    _one_line_error(out.stderr)
    assert f"127.0.0.1:{port}" in out.stderr and "--port" in out.stderr


def test_missing_binary_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        vmctl_cmd("serve", "--detach", "--port", str(free_port())),
        env={**os.environ, "VMCTL_LLAMA_SERVER": str(tmp_path / "nope")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    _one_line_error(out.stderr)
    assert "llama-server" in out.stderr


def test_server_dying_while_loading_shows_its_log(llama_server_bin: Path) -> None:
    out = subprocess.run(
        [*vmctl_cmd("serve", "--detach", "--port", str(free_port())), "--", "--no-such-flag"],
        env={**os.environ, "VMCTL_LLAMA_SERVER": str(llama_server_bin)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1
    _one_line_error(out.stderr)
    assert "no-such-flag" in out.stderr  # llama-server's own complaint, from its log


def test_foreground_ctrl_c_stops_everything(
    tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path, smollm2: Path
) -> None:
    home = tmp_path_factory.mktemp("fg")
    env = {**os.environ, "VMCTL_HOME": str(home), "VMCTL_LLAMA_SERVER": str(llama_server_bin)}
    port = free_port()
    proc = subprocess.Popen(
        vmctl_cmd("serve", "--port", str(port), "--name", "fg"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("serving smollm2-135m at http://127.0.0.1:")
        pids = _server_pids(home, "fg")
        assert chat(f"http://127.0.0.1:{port}/v1", "smollm2-135m")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (home / "servers" / "fg" / "run").exists()
    time.sleep(0.2)
    assert all(not Path(f"/proc/{p}").exists() for p in pids)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # the gateway let go of its port


def test_ls_logs_and_stop(vmctl_server: ServedModel) -> None:
    env = vmctl_server.env()
    out = subprocess.run(vmctl_cmd("ls", "--json"), env=env, capture_output=True, text=True)
    servers = json.loads(out.stdout)["servers"]
    assert [(s["name"], s["alias"], s["running"]) for s in servers] == [
        (vmctl_server.name, "smollm2-135m", True)
    ]
    chat(vmctl_server.base_url, vmctl_server.alias)
    logs = subprocess.run(
        vmctl_cmd("logs", vmctl_server.name, "--json"), env=env, capture_output=True, text=True
    )
    last = json.loads(logs.stdout.splitlines()[-1])
    assert last["path"] == "/v1/chat/completions" and last["status"] == 200


def test_sigkilled_supervisor_leaves_nothing_running(
    tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path, smollm2: Path
) -> None:
    """A crash of vmctl itself: llama-server dies with it, the next `vmctl ls` reaps."""
    home = tmp_path_factory.mktemp("kill")
    env = {**os.environ, "VMCTL_HOME": str(home), "VMCTL_LLAMA_SERVER": str(llama_server_bin)}
    port = free_port()
    subprocess.run(
        vmctl_cmd("serve", "--detach", "--port", str(port), "--name", "crash"),
        env=env, check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    meta = json.loads((home / "servers" / "crash" / "server.json").read_text())
    pids = _server_pids(home, "crash")
    os.kill(int(meta["supervisor"]["pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    out = subprocess.run(vmctl_cmd("ls", "--json"), env=env, capture_output=True, text=True)
    assert json.loads(out.stdout)["servers"] == []
    assert not (home / "servers" / "crash" / "run").exists()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    # Its audit log is kept until the user removes it.
    assert (home / "events" / "server-crash.jsonl").exists()
    out = subprocess.run(vmctl_cmd("rm", "crash"), env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not (home / "servers" / "crash").exists()


def test_rm_refuses_a_running_server(vmctl_server: ServedModel) -> None:
    out = subprocess.run(
        vmctl_cmd("rm", vmctl_server.name), env=vmctl_server.env(), capture_output=True, text=True
    )
    assert out.returncode == 1
    _one_line_error(out.stderr)
    assert "vmctl stop" in out.stderr
    assert vmctl_server.audit.exists()
