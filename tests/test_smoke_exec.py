"""nix/smoke-test.nix's exec client, run against a real guest's exec mux.

`nix flake check` cannot run here (no nixpkgs), so the smoke test's exec
subtest would first meet a guest wherever Nix works. Its client code is
taken from the rendered test script and run against a micro guest, which
runs the same exec agent and mux as the NixOS guest: a relay gives the
client a socket (as the smoke test's socket chardev does) on the FIFO pair
of the guest's last exec port. Only the command changes: the micro guest's
busybox has no `printenv`, so the client asks for `id -un; pwd` alone.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need
from test_nix import rendered_smoke_script
from vmctl import contract, paths

pytestmark = pytest.mark.qemu
CMD_LINE = 'cmd = b"id -un; pwd; printenv OPENCODE_CONFIG LLM_USER_PATH"'


def exec_subtest() -> str:
    script = rendered_smoke_script()
    start = script.index('with subtest("exec channel')
    block = script[start : script.index("with subtest(", start + 1)]
    assert CMD_LINE in block, "the smoke test's exec command changed: update this test"
    return block.replace(CMD_LINE, 'cmd = b"id -un; pwd"')


def relay(listen: Path, to_guest: Path, from_guest: Path) -> threading.Thread:
    """One client on `listen`, pumped to and from an exec port's FIFO pair."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(listen))
    server.listen(1)

    def pump() -> None:
        conn, _ = server.accept()
        server.close()
        wfd = os.open(to_guest, os.O_WRONLY)
        rfd = os.open(from_guest, os.O_RDONLY | os.O_NONBLOCK)
        try:
            while select.select([conn, rfd], [], [], 60)[0]:
                with contextlib.suppress(BlockingIOError):
                    data = os.read(rfd, 65536)
                    if data:
                        conn.sendall(data)
                data = b""
                with contextlib.suppress(BlockingIOError):
                    data = conn.recv(65536, socket.MSG_DONTWAIT)
                    if not data:
                        return  # the client is done
                if data:
                    os.write(wfd, data)
        finally:
            conn.close()
            os.close(wfd)
            os.close(rfd)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


class StubMachine:
    """The one attribute of the NixOS driver's Machine that the subtest uses."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir


@contextlib.contextmanager
def subtest(name: str) -> Iterator[None]:
    yield


def test_the_smoke_tests_exec_client_runs_a_command_in_a_micro_guest(
    tmp_path: Path, workspace: Path
) -> None:
    need(bool(subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).stdout), "qemu")
    vmctl = [sys.executable, "-m", "vmctl"]
    up = [*vmctl, "up", "-d", str(workspace), "--name", "smoke", "--ephemeral", "--detach"]
    r = subprocess.run([*up, "--net", "none"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    try:
        last = len(contract.exec_ports()) - 1  # vmctl itself starts at port 0
        to_guest, from_guest, _ = paths.instance("smoke").exec_fifos(last)
        state = tmp_path / "state"
        state.mkdir()
        pump = relay(state / "exec0.sock", to_guest, from_guest)
        code = compile(exec_subtest(), "smoke-test.nix (exec subtest)", "exec")
        exec(code, {"socket": socket, "agent": StubMachine(state), "subtest": subtest})
        pump.join(30)
        assert not pump.is_alive()
    finally:
        subprocess.run([*vmctl, "down", "smoke"], capture_output=True, timeout=60)
