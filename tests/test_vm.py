"""Real guests under TCG: the micro image, driven through the `vmctl` CLI.

One detached instance (net model) is shared by the assertions that only
read or run commands; a second guest beside it boots its own. Failures
and interrupts are in test_vm_failures. Every test bounds its waits and
kills what it starts.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port
from guests import VMCTL, daemons_of, env, instance_dir, no_trace, share_args, up_args, vmctl
from vmctl import agents, events
from vmctl.procs import ProcessRef

pytestmark = pytest.mark.qemu
__all__ = ["env"]  # the module-scoped fixture, used by name
MODEL = "smoke-model"


class FakeModel(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> http.server.ThreadingHTTPServer:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def model() -> Iterator[int]:
    srv = serve(FakeModel)
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def shared(
    env: dict[str, str], model: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """One detached guest with `--net model` against the fake model server."""
    ws = tmp_path_factory.mktemp("ws")
    (ws / "from-host.txt").write_text("host says hi\n")
    args = up_args(env, ws, "shared", "--detach", "--model-endpoint", f"127.0.0.1:{model}")
    forward = free_port()
    env["TEST_FORWARD"] = str(forward)
    r = vmctl(env, *args, "-p", f"{forward}:8000", "--timeout", "90")
    try:
        assert r.returncode == 0, r.stderr
        assert "vmctl exec shared --" in r.stdout
        yield "shared", ws
    finally:
        vmctl(env, "down", "shared", timeout=60)


def test_exec_streams_output_and_propagates_status(
    shared: tuple[str, Path], env: dict[str, str]
) -> None:
    r = vmctl(env, "exec", "shared", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    r = vmctl(env, "exec", "shared", "--", "printf", "%s|", "a b", "it's")
    assert (r.returncode, r.stdout) == (0, "a b|it's|")


def test_workspace_is_shared_both_ways(shared: tuple[str, Path], env: dict[str, str]) -> None:
    name, ws = shared
    r = vmctl(env, "exec", name, "--", "sh", "-c", "cat /workspace/from-host.txt > /workspace/out")
    assert r.returncode == 0, r.stdout
    assert (ws / "out").read_text() == "host says hi\n"
    script = "ln -s /etc/passwd /workspace/l && readlink /workspace/l; chmod 4755 /workspace/out"
    r = vmctl(env, "exec", name, "--", "sh", "-c", script)
    assert r.stdout.startswith("/etc/passwd\n"), r.stdout  # a symlink inside the guest...
    assert not (ws / "l").is_symlink(), "a guest symlink must not become a host symlink"
    # Only the x bits cross (vmctl.sidecars.modes); the setuid bit stays in the xattr.
    assert (ws / "out").stat().st_mode & 0o7777 == 0o755, "guest setuid must stay in xattrs"


def test_net_model_reaches_only_the_model(
    shared: tuple[str, Path], env: dict[str, str], model: int
) -> None:
    other = serve(FakeModel)
    try:
        probe = "timeout 5 wget -q -O - http://{}/v1/models >/dev/null 2>&1; echo $?"
        cmds = [probe.format(t) for t in ("10.0.2.2:8080", f"10.0.2.2:{other.server_address[1]}",
                                          f"10.0.2.254:{model}", "1.1.1.1:80")]  # fmt: skip
        r = vmctl(env, "exec", "shared", "--", "sh", "-c", "; ".join(cmds))
    finally:
        other.shutdown()
        other.server_close()
    codes = r.stdout.split()
    assert codes[0] == "0", r.stdout
    assert all(c != "0" for c in codes[1:]), r.stdout
    # The endpoint is no vmctl server: the guest's sidecar audits each request itself.
    evs = list(events.read_file(Path(env["VMCTL_HOME"]) / "events" / "guest-shared.jsonl"))
    hits = [e for e in evs if e.kind == "request" and e.path == "/v1/models"]
    conns = [e for e in evs if e.kind == "connection" and e.action == "close"]
    assert hits and conns and conns[-1].port == model and (conns[-1].bytes_down or 0) > 0


def test_opencode_json_in_guest_is_exact(shared: tuple[str, Path], env: dict[str, str]) -> None:
    ep = agents.AgentEndpoint("http://10.0.2.2:8080/v1", (MODEL,))
    expected = agents.guest_files(ep)["opt/vmctl/opencode.json"].decode()
    r = vmctl(env, "exec", "shared", "--", "cat", "/home/agent/.config/opencode/opencode.json")
    assert r.returncode == 0
    assert r.stdout == expected
    assert json.loads(r.stdout)["model"].endswith(MODEL)


def test_status_json(shared: tuple[str, Path], env: dict[str, str], model: int) -> None:
    r = vmctl(env, "status", "shared", "--json")
    data = json.loads(r.stdout)
    assert data["state"] == "running" and data["net"] == "model" and data["share"] == "9p"
    assert data["model_endpoint"] == f"127.0.0.1:{model}"
    assert ProcessRef.of(data["pid"]).alive() and data["uptime_s"] > 0


def test_second_instance_net_none_then_ephemeral_down(
    shared: tuple[str, Path], env: dict[str, str], tmp_path: Path
) -> None:
    """A second, detached guest beside the first, its workspace over virtio-fs."""
    args = up_args(env, tmp_path, "second", "--detach", "--ephemeral", "--net", "none")
    r = vmctl(env, *args, *share_args("virtiofs"))
    assert r.returncode == 0, r.stderr
    try:
        r = vmctl(env, "exec", "second", "--", "ls", "/sys/class/net")
        assert r.stdout.split() == ["lo"]
        assert vmctl(env, "exec", "shared", "--", "true").returncode == 0
        status = json.loads(vmctl(env, "status", "second", "--json").stdout)
        pid = status["pid"]
        assert status["share"] == "virtiofs" and daemons_of(tmp_path)
        r = vmctl(env, "exec", "second", "--", "sh", "-c", "echo vfs > /workspace/w")
        assert (tmp_path / "w").read_text() == "vfs\n", r.stderr
    finally:
        assert vmctl(env, "down", "second").returncode == 0
    no_trace(env, "second", pid, 5)
    assert not instance_dir(env, "second").exists()
    assert daemons_of(tmp_path) == []


def test_port_forward_is_loopback_only(shared: tuple[str, Path], env: dict[str, str]) -> None:
    """`-p HOST:GUEST` reaches a guest server, bound on the host's 127.0.0.1 only."""
    import urllib.request

    name, ws = shared
    (ws / "page.txt").write_text("served from the guest\n")
    r = vmctl(env, "exec", name, "--", "httpd", "-p", "8000", "-h", "/workspace")
    assert r.returncode == 0, r.stdout
    port = int(env["TEST_FORWARD"])
    url = f"http://127.0.0.1:{port}/page.txt"
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.read() == b"served from the guest\n"
    listening = [
        line.split()[1]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port
    ]
    assert listening == [f"0100007F:{port:04X}"]


def test_console_attach_logs_in_as_agent(shared: tuple[str, Path], env: dict[str, str]) -> None:
    """`vmctl console` on a real terminal, driven with pexpect like a person would."""
    import pexpect

    name, _ = shared
    loud = {k: v for k, v in env.items() if k != "VMCTL_QUIET"}
    child = pexpect.spawn(
        VMCTL[0], [*VMCTL[1:], "console", name], env=loud, timeout=60, encoding="utf-8"
    )
    try:
        child.expect("Ctrl-] detaches")  # attached: what we type now reaches the guest
        child.expect(r"/workspace \$ ")  # the login shell's prompt, nothing typed
        child.sendline("id -un; echo ok-$((6 * 7))")
        child.expect("ok-42")
        assert "agent" in (child.before or "")
        child.sendcontrol("]")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    # Detaching leaves the guest running.
    assert vmctl(env, "exec", name, "--", "true").returncode == 0
