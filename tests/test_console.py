"""Console attach against a fake guest console (a UNIX socket server), no QEMU."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from vmctl import contract
from vmctl.vm.console import attach

EXIT = b"\x1e" + contract.raw()["console"]["console_exit_marker"].encode() + b"\r\n"


def fake_console(path: Path, script: list[bytes], got: list[bytes]) -> threading.Thread:
    """Accept one client; record what it sends first, then send `script` and close."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        got.append(conn.recv(64))
        for chunk in script:
            conn.sendall(chunk)
        conn.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("stop", [True, False])
def test_attach_wakes_the_prompt_and_reports_the_shell_exit(tmp_path: Path, stop: bool) -> None:
    got: list[bytes] = []
    # The marker split across two reads, as a serial line may deliver it.
    t = fake_console(tmp_path / "c.sock", [b"/workspace $ exit\r\n" + EXIT[:5], EXIT[5:]], got)
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    why = attach(tmp_path / "c.sock", stdin_r, out_w, stop_on_exit=stop, name="box")
    t.join(5)
    os.close(out_w)
    shown = os.read(out_r, 65536)
    assert got == [b"\r"]  # one Enter on attach: the guest's shell shows a fresh prompt
    if stop:
        assert why == "exited"
    else:  # `vmctl console`: the guest starts a new shell; say how to leave
        assert why == "closed" and b"`vmctl down box` stops the guest" in shown
    for fd in (stdin_r, stdin_w, out_r):
        os.close(fd)


def test_ctrl_bracket_detaches(tmp_path: Path) -> None:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "c.sock"))
    srv.listen(1)
    stdin_r, stdin_w = os.pipe()
    os.write(stdin_w, b"ls\x1d")
    out_r, out_w = os.pipe()
    assert attach(tmp_path / "c.sock", stdin_r, out_w) == "detached"
    conn, _ = srv.accept()
    conn.settimeout(5)
    sent = b""
    while len(sent) < 3 and (chunk := conn.recv(64)):
        sent += chunk
    assert sent == b"\rls"  # typed bytes before Ctrl-] reach the guest, not Ctrl-]
    for s in (conn, srv):
        s.close()
    for fd in (stdin_r, stdin_w, out_r, out_w):
        os.close(fd)
