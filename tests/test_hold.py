"""vmctl.sidecars.hold: a guest's sidecars listen at once and start up only
when `vmctl up` closes their gate (the guest is ready, or `vmctl up` died).

A stand-in sidecar module records when it runs and serves the socket it
was handed; the real sidecars go through the same path in every guest
test (test_vm, test_guest_bounds, test_egress_guest, test_e2e).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmctl.sidecars import hold

STAND_IN = """
import sys, time
from vmctl.sidecars import hold
s = hold.listener(sys.argv[1], 8)
s.setblocking(True)
conn, _ = s.accept()
conn.sendall(("started " + " ".join(sys.argv[1:])).encode())
conn.close()
"""


def _spawn(tmp_path: Path, gate: int) -> tuple[subprocess.Popen[bytes], Path]:
    (tmp_path / "standin_sidecar.py").write_text(STAND_IN)
    sock = tmp_path / "s.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    argv = hold.argv(gate, str(sock), "standin_sidecar", [str(sock), "--flag"])
    proc = subprocess.Popen(argv, env=env, pass_fds=(gate,), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the held sidecar never listened"
        time.sleep(0.01)
    return proc, sock


def _queued_client(sock: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(15)
    client.connect(str(sock))  # accepted by the kernel into the backlog
    return client


def test_listens_at_once_and_starts_only_when_the_gate_closes(tmp_path: Path) -> None:
    gate, opened = os.pipe()
    proc, sock = _spawn(tmp_path, gate)
    os.close(gate)
    try:
        assert sock.stat().st_mode & 0o777 == 0o600
        client = _queued_client(sock)
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recv(100)  # held: the sidecar's module has not run
        os.close(opened)
        opened = -1
        client.settimeout(15)
        # The connection made while held is served by the started module:
        # it was handed the very socket `hold` bound, and its arguments.
        assert client.recv(100) == f"started {sock} --flag".encode()
        assert proc.wait(15) == 0
    finally:
        if opened >= 0:
            os.close(opened)
        proc.kill()
        proc.wait()


def test_a_killed_owner_releases_the_gate(tmp_path: Path) -> None:
    """`vmctl up` SIGKILLed mid-boot: the kernel closes the gate, the sidecar
    starts, and its own watchdog (reading the record) stops the guest."""
    gate, opened = os.pipe()
    owner = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(opened,)
    )
    os.close(opened)
    proc, sock = _spawn(tmp_path, gate)
    os.close(gate)
    try:
        client = _queued_client(sock)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert client.recv(100).startswith(b"started ")
    finally:
        for p in (owner, proc):
            p.kill()
            p.wait()


def test_without_a_gate_the_module_runs_directly(tmp_path: Path) -> None:
    assert hold.argv(None, "x.sock", "vmctl.sidecars.guestpath", ["c.json"]) == [
        sys.executable,
        "-m",
        "vmctl.sidecars.guestpath",
        "c.json",
    ]


def test_a_socket_not_handed_over_is_bound_fresh(tmp_path: Path) -> None:
    """A sidecar run directly (tests, `vmctl run`'s paths) binds its own,
    replacing a stale file, with the same mode."""
    path = tmp_path / "fresh.sock"
    path.write_text("stale")
    s = hold.listener(str(path), 4)
    try:
        assert not s.getblocking()
        assert path.stat().st_mode & 0o777 == 0o600
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(path))
    finally:
        s.close()


def test_bad_usage_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vmctl.sidecars.hold", "x"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == hold.USAGE
