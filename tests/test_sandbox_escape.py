"""Escape attempts under real bubblewrap, with the shipped profiles.

The "binary" is this Python interpreter running a small probe (its install
prefix bound read-only through extra_read); each attempt prints OK or
DENIED and the test also checks the host side (no file appeared, the
listener saw no connection).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vmctl.sandbox import bwrap, policy
from vmctl.sandbox import launch as sandbox
from vmctl.sandbox.resolve import within

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bwrap is Linux")

PY = Path(os.path.realpath(sys.executable))
PROBE = r"""
import os, socket, sys
op, arg = sys.argv[1], sys.argv[2]
try:
    if op == "tcp":
        socket.create_connection(("127.0.0.1", int(arg)), timeout=3).close()
    elif op == "unix":
        s = socket.socket(socket.AF_UNIX); s.settimeout(3); s.connect(arg); s.close()
    elif op == "bind":
        s = socket.socket(socket.AF_UNIX); s.bind(arg); s.listen(1); s.close()
    elif op == "stat":
        os.stat(arg)
    elif op == "read":
        open(arg, "rb").read()
    elif op == "write":
        with open(arg, "w") as f:
            f.write("escaped")
    elif op == "exec":
        os.execv(arg, [arg, "-c", "true"])
    elif op == "environ":
        sys.stdout.write(open("/proc/self/environ", "rb").read().decode().replace("\0", "\n"))
    print("OK")
except OSError as e:
    print("DENIED", e.errno)
"""


def stand_in_gpu_profiles(folder: Path) -> Path:
    """The shipped profiles, with [gpu.nvidia]'s device nodes replaced by stand-ins.

    No GPU exists on the machines these tests run on: /dev/cpu_dma_latency (absent
    from bwrap's minimal /dev) and /dev/zero
    stand in for /dev/nvidia*, so the grant (device binds, sysfs and driver
    reads, variables) is rendered and run for real around the same probes.
    """
    shipped = Path(policy.search_path()[-1])
    folder.mkdir(parents=True, exist_ok=True)
    for f in shipped.glob("*.toml"):
        text = f.read_text()
        if f.stem == "llama-server":
            start = text.index("[gpu.nvidia]\ndevices = [")
            end = text.index("\n]", start) + 2  # the list's closing line
            text = (
                text[:start]
                + '[gpu.nvidia]\ndevices = ["/dev/cpu_dma_latency", "/dev/zero"]'
                + text[end:]
            )
        (folder / f.name).write_text(text)
    return folder


@pytest.fixture(params=["cpu", "gpu-stand-in-devices"])
def server_ctx(
    request: pytest.FixtureRequest, tmp_path: Path, bwrap_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> sandbox.SandboxContext:
    sandbox.check_available()
    gpu: tuple[str, ...] = ()
    if request.param != "cpu":
        monkeypatch.setenv("VMCTL_PROFILES_DIR", str(stand_in_gpu_profiles(tmp_path / "profiles")))
        gpu = ("nvidia",)
    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    model = tmp_path / "models" / "m.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF" + b"\0" * 64)
    return sandbox.SandboxContext(
        binary=PY,
        cache=run / "cache",
        runtime=run,
        model=(model,),
        endpoint_socket=run / "llama.sock",
        extra_read=(Path(sys.base_prefix),),
        gpu=gpu,
    )


@pytest.fixture
def client_ctx(
    tmp_path: Path, workspace: Path, bwrap_bin: Path
) -> tuple[sandbox.SandboxContext, socket.socket]:
    """The shell profile with a live UNIX-socket endpoint it may connect to."""
    sandbox.check_available()
    state = tmp_path / "state"
    state.mkdir()
    sock_path = tmp_path / "gw" / "gw.sock"
    sock_path.parent.mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    listener.listen(4)
    ctx = sandbox.SandboxContext(
        binary=PY,
        workspace=sandbox.check_workspace(workspace),
        state=state,
        endpoint_socket=sock_path,
        extra_read=(Path(sys.base_prefix),),
    )
    return ctx, listener


@pytest.fixture
def home_canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    canary = home / ".aws-credentials"
    canary.write_text("canary-secret")
    monkeypatch.setenv("HOME", str(home))
    return canary


@pytest.fixture
def tcp_listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    s.setblocking(False)
    return s


def probe(profile: str, ctx: sandbox.SandboxContext, op: str, arg: str) -> str:
    cmd = sandbox.sandboxed_command(profile, [str(PY), "-I", "-c", PROBE, op, arg], ctx)
    out = subprocess.run(cmd.argv, env=cmd.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def assert_no_connection(listener: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        listener.accept()


@pytest.mark.parametrize("profile", ["llama-server", "shell"])
def test_tcp_to_host_loopback_fails(
    profile: str, server_ctx: sandbox.SandboxContext, client_ctx: tuple, tcp_listener: socket.socket
) -> None:
    ctx = server_ctx if profile == "llama-server" else client_ctx[0]
    port = tcp_listener.getsockname()[1]
    assert probe(profile, ctx, "tcp", str(port)).startswith("DENIED")
    assert_no_connection(tcp_listener)


@pytest.mark.parametrize("profile", ["llama-server", "shell"])
def test_home_canary_unreadable(
    profile: str, server_ctx: sandbox.SandboxContext, client_ctx: tuple, home_canary: Path
) -> None:
    ctx = server_ctx if profile == "llama-server" else client_ctx[0]
    cmd = sandbox.sandboxed_command(profile, [str(PY)], ctx)
    assert cmd.resolved is not None
    placed = [p for _, p in bwrap.mounts(cmd.resolved)]
    assert not within(home_canary.resolve(), placed), "canary must lie outside every bind"
    assert probe(profile, ctx, "read", str(home_canary)).startswith("DENIED")


def test_server_writes_only_its_cache(server_ctx: sandbox.SandboxContext, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    beside_model = server_ctx.model[0].parent / "evil.gguf"
    targets = (outside, beside_model, Path("/evil"), Path("/usr/lib/evil"), Path("/dev/evil"))
    for target in (*targets, server_ctx.model[0]):
        assert probe("llama-server", server_ctx, "write", str(target)).startswith("DENIED")
    assert not outside.exists() and not beside_model.exists()
    assert server_ctx.model[0].read_bytes().startswith(b"GGUF")
    inside = server_ctx.cache / "kv.bin"  # type: ignore[operator]
    assert probe("llama-server", server_ctx, "write", str(inside)) == "OK"
    assert inside.read_text() == "escaped"


def test_server_reads_model_and_binds_its_socket(server_ctx: sandbox.SandboxContext) -> None:
    assert probe("llama-server", server_ctx, "read", str(server_ctx.model[0])) == "OK"
    sock = server_ctx.endpoint_socket
    assert sock is not None
    assert probe("llama-server", server_ctx, "bind", str(sock)) == "OK"
    assert sock.is_socket()  # the socket folder is shared with the host gateway


def test_server_cannot_exec_a_shell(server_ctx: sandbox.SandboxContext) -> None:
    assert probe("llama-server", server_ctx, "exec", "/bin/sh").startswith("DENIED")


@pytest.mark.parametrize("profile", ["llama-server", "shell"])
def test_credentials_never_reach_the_child(
    profile: str,
    server_ctx: sandbox.SandboxContext,
    client_ctx: tuple,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx = server_ctx if profile == "llama-server" else client_ctx[0]
    for name in ("AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "HF_TOKEN"):
        monkeypatch.setenv(name, f"canary-{name}")
    monkeypatch.setenv("LANG", "C.UTF-8")
    environ = probe(profile, ctx, "environ", "-")
    assert "canary-" not in environ
    assert "LANG=C.UTF-8" in environ.splitlines()  # the allow-list does pass
    home = ctx.cache if profile == "llama-server" else ctx.state
    assert f"HOME={home}" in environ.splitlines()


def test_client_works_inside_workspace_only(client_ctx: tuple, tmp_path: Path) -> None:
    ctx, _ = client_ctx
    inside = ctx.workspace / "notes.txt"
    assert probe("shell", ctx, "write", str(inside)) == "OK"
    assert inside.read_text() == "escaped"
    assert probe("shell", ctx, "write", str(ctx.state / "config")) == "OK"
    for target in ("/evil", "/usr/lib/evil", str(tmp_path / "home" / "evil")):
        assert probe("shell", ctx, "write", target).startswith("DENIED")
    # /tmp is the client's private in-memory folder: a write there never reaches the host.
    outside = tmp_path / "outside.txt"
    probe("shell", ctx, "write", str(outside))
    assert not outside.exists()


def test_client_reaches_only_the_endpoint(client_ctx: tuple, tcp_listener: socket.socket) -> None:
    ctx, listener = client_ctx
    assert probe("shell", ctx, "unix", str(ctx.endpoint_socket)) == "OK"
    conn, _ = listener.accept()
    conn.close()
    port = tcp_listener.getsockname()[1]
    assert probe("shell", ctx, "tcp", str(port)).startswith("DENIED")
    assert_no_connection(tcp_listener)


def test_shell_tools_run_in_the_workspace(client_ctx: tuple) -> None:
    """The allow-listed shell works; what it is not given is absent."""
    ctx, _ = client_ctx
    script = "echo made > made.txt && cat made.txt && ls /root /home 2>&1; exit 7"
    cmd = sandbox.sandboxed_command("shell", ["sh", "-c", script], ctx)
    out = subprocess.run(cmd.argv, env=cmd.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 7
    assert "made" in out.stdout and "No such file" in out.stdout
    assert (ctx.workspace / "made.txt").read_text() == "made\n"


def test_gpu_grant_binds_exactly_its_devices(server_ctx: sandbox.SandboxContext) -> None:
    """The stand-in device is visible only with the grant; the network stays absent."""
    cmd = sandbox.sandboxed_command("llama-server", [str(PY)], server_ctx)
    granted = "--dev-bind" in cmd.argv
    assert granted == bool(server_ctx.gpu)
    want = "OK" if server_ctx.gpu else "DENIED"
    assert probe("llama-server", server_ctx, "stat", "/dev/cpu_dma_latency").startswith(want)
    assert "--unshare-all" in cmd.argv and "--share-net" not in cmd.argv
