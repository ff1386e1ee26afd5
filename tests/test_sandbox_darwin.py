"""The rendered SBPL profiles under the real /usr/bin/sandbox-exec (macOS CI job).

Skipped everywhere but macOS. The probe is this Python interpreter (its
prefix granted through extra_read/extra_exec): a connect out, a read of a
canary in $HOME and a write outside the workspace all fail; work inside
the workspace succeeds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vmctl.sandbox import launch as sandbox

pytestmark = [
    pytest.mark.darwin,
    pytest.mark.skipif(sys.platform != "darwin", reason="sandbox-exec runs only on macOS"),
]

PY = Path(os.path.realpath(sys.executable))
PREFIX = Path(os.path.realpath(sys.base_prefix))
PROBE = r"""
import socket, sys
op, arg = sys.argv[1], sys.argv[2]
try:
    if op == "tcp":
        socket.create_connection(("127.0.0.1", int(arg)), timeout=3).close()
    elif op == "read":
        open(arg, "rb").read()
    elif op == "write":
        open(arg, "w").write("x")
    print("OK")
except OSError as e:
    print("DENIED", e.errno)
"""


@pytest.fixture
def ctx(tmp_path: Path, workspace: Path) -> sandbox.SandboxContext:
    sandbox.check_available("darwin")
    state = tmp_path / "state"
    state.mkdir()
    return sandbox.SandboxContext(
        binary=PY,
        workspace=sandbox.check_workspace(workspace),
        state=state,
        extra_read=(PREFIX,),
        extra_exec=(PY,),
    )


def probe(profile: str, ctx: sandbox.SandboxContext, op: str, arg: str) -> str:
    cmd = sandbox.sandboxed_command(
        profile, [str(PY), "-I", "-c", PROBE, op, arg], ctx, profile_dir=ctx.state
    )
    cmd.write_files()
    out = subprocess.run(
        cmd.argv, env=cmd.env, cwd=cmd.cwd, capture_output=True, text=True, timeout=60
    )
    return out.stdout.strip() or f"DENIED (exit {out.returncode}: {out.stderr.strip()[-200:]})"


def test_connect_out_fails(ctx: sandbox.SandboxContext) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    assert probe("shell", ctx, "tcp", str(listener.getsockname()[1])).startswith("DENIED")
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_home_canary_unreadable(
    ctx: sandbox.SandboxContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = Path.home() / ".vmctl-test-canary"
    canary.write_text("canary")
    try:
        assert probe("shell", ctx, "read", str(canary)).startswith("DENIED")
    finally:
        canary.unlink()


def test_write_outside_fails_inside_works(ctx: sandbox.SandboxContext, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    assert probe("shell", ctx, "write", str(outside)).startswith("DENIED")
    assert not outside.exists()
    inside = ctx.workspace / "inside.txt"  # type: ignore[operator]
    assert probe("shell", ctx, "write", str(inside)) == "OK"
    assert inside.read_text() == "x"


def test_llama_server_profile_blocks_outbound(tmp_path: Path) -> None:
    sandbox.check_available("darwin")
    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    ctx = sandbox.SandboxContext(
        binary=PY, cache=run / "cache", runtime=run, model=(model,),
        endpoint_socket=run / "s.sock", extra_read=(PREFIX,), extra_exec=(PY,),
    )  # fmt: skip
    assert probe("llama-server", ctx, "read", str(model)) == "OK"
    # An outbound attempt is answered with SIGKILL: no OK is ever printed.
    assert not probe("llama-server", ctx, "tcp", "9").startswith("OK")
    assert probe("llama-server", ctx, "write", str(tmp_path / "x")).startswith("DENIED")
