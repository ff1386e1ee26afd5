"""Real guests under TCG: the micro image, driven through the `vmctl` CLI.

One detached instance (net model) is shared by the assertions that only
read or run commands; lifecycle tests (Ctrl-C, SIGKILL, never ready, two at
once) boot their own. Every test bounds its waits and kills what it starts.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port, need
from vmctl import agents, events
from vmctl.images.choose import resolve_image
from vmctl.procs import ProcessRef
from vmctl.vm import virtiofs
from vmctl.vm.console import wait_for_marker

pytestmark = pytest.mark.qemu
MODEL = "smoke-model"
VMCTL = [sys.executable, "-m", "vmctl"]


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
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private VMCTL_HOME for the module; the image cache is shared (built once)."""
    need(bool(subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).stdout), "qemu")
    cache = os.environ.get("VMCTL_CACHE") or str(Path.home() / ".local/state/vmctl/cache")
    home = tmp_path_factory.mktemp("vm", numbered=True)
    e = {**os.environ, "VMCTL_HOME": str(home), "VMCTL_CACHE": cache, "VMCTL_QUIET": "1"}
    old = {k: os.environ.get(k) for k in ("VMCTL_HOME", "VMCTL_CACHE")}
    os.environ["VMCTL_CACHE"] = cache
    try:
        manifest = resolve_image("micro").path
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    e["TEST_MANIFEST"] = str(manifest)
    yield e
    for root in (home / "instances").glob("*"):  # kill anything a failed test left
        subprocess.run([*VMCTL, "down", root.name], env=e, timeout=60, check=False)


def vmctl(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VMCTL, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def up_args(env: dict[str, str], ws: Path, name: str, *extra: str) -> list[str]:
    return ["up", "-d", str(ws), "--name", name, "--image", env["TEST_MANIFEST"], *extra]


def instance_dir(env: dict[str, str], name: str) -> Path:
    return Path(env["VMCTL_HOME"]) / "instances" / name


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


def _no_trace(env: dict[str, str], name: str, pid: int, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and ProcessRef.of(pid).alive():
        time.sleep(0.1)
    assert not ProcessRef.of(pid).alive(), "QEMU still running"


def test_second_instance_net_none_then_ephemeral_down(
    shared: tuple[str, Path], env: dict[str, str], tmp_path: Path
) -> None:
    """A second, detached guest beside the first, its workspace over virtio-fs."""
    args = up_args(env, tmp_path, "second", "--detach", "--ephemeral", "--net", "none")
    r = vmctl(env, *args, *_share_args("virtiofs"))
    assert r.returncode == 0, r.stderr
    try:
        r = vmctl(env, "exec", "second", "--", "ls", "/sys/class/net")
        assert r.stdout.split() == ["lo"]
        assert vmctl(env, "exec", "shared", "--", "true").returncode == 0
        status = json.loads(vmctl(env, "status", "second", "--json").stdout)
        pid = status["pid"]
        assert status["share"] == "virtiofs" and _daemons_of(tmp_path)
        r = vmctl(env, "exec", "second", "--", "sh", "-c", "echo vfs > /workspace/w")
        assert (tmp_path / "w").read_text() == "vfs\n", r.stderr
    finally:
        assert vmctl(env, "down", "second").returncode == 0
    _no_trace(env, "second", pid, 5)
    assert not instance_dir(env, "second").exists()
    assert _daemons_of(tmp_path) == []


def _foreground_up(
    env: dict[str, str], ws: Path, name: str, *extra: str
) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [*VMCTL, *up_args(env, ws, name, "--ephemeral", "--net", "none", *extra)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    log = instance_dir(env, name) / "console.log"
    try:
        wait_for_marker(
            log, "VMCTL-READY", 90, abort=lambda: None if proc.poll() is None else "exited"
        )
        meta = json.loads((instance_dir(env, name) / "instance.json").read_text())
    except BaseException:
        proc.kill()
        raise
    return proc, meta["qemu"]["pid"]


def _daemons_of(ws: Path) -> list[int]:
    """Pids of virtio-fs daemons serving `ws` (from /proc: whoever started them)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if f"source={ws}".encode() in args:
            found.append(int(cmdline.parent.name))
    return found


def _share_args(share: str) -> tuple[str, ...]:
    if share == "virtiofs":
        need(virtiofs.find_daemon() is not None, "virtiofsd (qemu-system-common)")
    return ("--share", share)


@pytest.mark.parametrize("share", ["9p", "virtiofs"])
def test_ctrl_c_leaves_nothing(env: dict[str, str], tmp_path: Path, share: str) -> None:
    proc, pid = _foreground_up(env, tmp_path, "intr", *_share_args(share))
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        proc.kill()
        ProcessRef.of(pid).terminate(2)
    _no_trace(env, "intr", pid, 2)
    assert not instance_dir(env, "intr").exists()
    assert _daemons_of(tmp_path) == []


@pytest.mark.parametrize("share", ["9p", "virtiofs"])
def test_sigkill_of_vmctl_leaves_no_qemu_and_next_run_reaps(
    env: dict[str, str], tmp_path: Path, share: str
) -> None:
    proc, pid = _foreground_up(env, tmp_path, "killed", *_share_args(share))
    ref = ProcessRef.of(pid)
    try:
        if share == "virtiofs":
            assert len(_daemons_of(tmp_path)) >= 1  # the daemon, in its own pid namespace
        proc.kill()
        proc.wait(5)
        _no_trace(env, "killed", pid, 5)
        deadline = time.monotonic() + 5
        while _daemons_of(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _daemons_of(tmp_path) == [], "a virtio-fs daemon outlived vmctl"
    finally:
        ref.terminate(2)
    assert instance_dir(env, "killed").exists()
    code = "from vmctl.vm import instance; print([i.name for i in instance.list_instances()])"
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert "killed" not in r.stdout and r.returncode == 0, r.stderr
    assert not instance_dir(env, "killed").exists()


def test_guest_that_never_becomes_ready_fails_clearly(env: dict[str, str], tmp_path: Path) -> None:
    start = time.monotonic()
    args = up_args(
        env, tmp_path, "stuck", "--ephemeral", "--net", "none", "--timeout", "8", "--detach"
    )
    r = vmctl(env, *args, "--", "-append", "console=ttyS0 rdinit=/bin/sh", timeout=60)
    assert r.returncode == 1
    assert "error: guest stuck did not become ready within 8 s" in r.stderr
    assert time.monotonic() - start < 40
    assert not instance_dir(env, "stuck").exists()


def test_missing_workspace_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    r = vmctl(env, *up_args(env, tmp_path / "nope", "nows", "--detach"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: workspace") and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


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


def test_kernel_panic_fails_fast_with_the_panic_line(env: dict[str, str], tmp_path: Path) -> None:
    """The console is watched from the first line: a panic ends the wait at once."""
    start = time.monotonic()
    args = up_args(
        env, tmp_path, "panics", "--ephemeral", "--net", "none", "--timeout", "100", "--detach"
    )
    # No init anywhere: every kernel panics (one with a block layer at mounting a root).
    boot = "console=ttyS0 rdinit=/nonexistent init=/nonexistent"
    r = vmctl(env, *args, "--", "-append", boot, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "error: guest panics failed to boot" in r.stderr
    assert "Kernel panic" in r.stderr
    assert time.monotonic() - start < 60
    assert not instance_dir(env, "panics").exists()


def test_qemu_refusing_its_arguments_is_named_with_its_own_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    """QEMU exits before it takes the console vmctl connected: its status and error, not a reset."""
    args = up_args(env, tmp_path, "badarg", "--ephemeral", "--net", "none", "--detach")
    r = vmctl(env, *args, "--", "-no-such-option", timeout=60)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "error: guest badarg failed to boot: QEMU exited with status 1" in r.stderr, r.stderr
    assert "-no-such-option: invalid option" in r.stderr
    assert not instance_dir(env, "badarg").exists()
    # The sidecar started before QEMU; it went with the failed boot.
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(instance_dir(env, "badarg")).encode() in cmdline.read_bytes():
                left.append(cmdline.parent.name)
        except OSError:
            continue
    assert left == []


def test_a_stand_in_virtiofs_daemon_that_dies_is_named_and_nothing_is_left(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The daemon's own words reach the user, not only QEMU's "Connection refused".

    A stand-in daemon: the real one cannot be made to fail on cue once vmctl
    has checked the folder it serves.
    """
    fake = tmp_path / "virtiofsd"
    fake.write_text("#!/bin/sh\n# -o source=PATH\necho 'cannot serve this folder' >&2\nexit 1\n")
    fake.chmod(0o755)
    ws = tmp_path / "ws"
    ws.mkdir()
    args = up_args(env, ws, "vfsdead", "--ephemeral", "--detach", "--net", "none")
    r = vmctl({**env, "VMCTL_VIRTIOFSD": str(fake)}, *args, "--share", "virtiofs")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "error: guest vfsdead failed to boot" in r.stderr, r.stderr
    assert "virtiofsd: cannot serve this folder" in r.stderr, r.stderr
    assert not instance_dir(env, "vfsdead").exists()
