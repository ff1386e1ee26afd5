"""Talking to a guest: its log console and its framed exec channel.

Logs and commands travel on separate channels (style point 4). The serial
console (ttyS0) is for humans and markers: QEMU copies it to console.log,
which `wait_for_marker` follows, and `attach` joins it interactively. The
exec channel (vmctl.vm.execchan, re-exported here) is a virtio-serial port
with one framed request at a time.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import termios
import time
import tty
from collections.abc import Callable
from pathlib import Path

from vmctl import contract
from vmctl.errors import VMError
from vmctl.poll import Timeout, wait_until
from vmctl.vm.execchan import ExecChannel

__all__ = ["ExecChannel", "attach", "expect_ready", "listen", "wait_for_marker"]

DETACH_KEY = b"\x1d"  # Ctrl-]
RESPAWN_NOTE = (
    "vmctl: the console shell exited; the guest starts a new one."
    " Ctrl-] detaches, `vmctl down {name}` stops the guest."
)


def wait_for_marker(
    log: Path, marker: str, timeout: float, abort: Callable[[], str | None] | None = None
) -> float:
    """Follow `log` until a line holds `marker`; seconds waited.

    Raises TimeoutError (or VMError with `abort`'s reason) whose text is the
    reason; callers add `tail_lines(log)` as details.
    """
    start = time.monotonic()
    needle = marker.encode()
    buf = b""
    offset = 0
    while True:
        with contextlib.suppress(FileNotFoundError), open(log, "rb") as f:
            f.seek(offset)
            chunk = f.read()
            offset += len(chunk)
            buf = buf[-len(needle) :] + chunk
            if needle in buf:
                return time.monotonic() - start
        if abort is not None and (reason := abort()):
            raise VMError(reason)
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{marker} not seen within {timeout:.0f} s")
        time.sleep(0.02)


#: Lines after which a guest will never become ready.
FATAL = (
    r"Kernel panic - not syncing[^\r\n]*\r?\n",
    r"Attempted to kill init[^\r\n]*\r?\n",
)


def listen(sock_path: Path) -> tuple[socket.socket, socket.socket]:
    """The console's listening socket for QEMU, and vmctl's connection to it.

    vmctl binds the console itself and connects before QEMU exists: the
    connection waits in the backlog, and QEMU (`wait=on` on the inherited
    fd, vmctl.vm.qemu.channel_argv) accepts it before the guest's first
    instruction. No polling for a socket to appear, and no pause.
    """
    sock_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX)
    client = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(sock_path))
        listener.listen(1)
        client.connect(str(sock_path))
    except OSError as e:
        listener.close()
        client.close()
        raise VMError(f"cannot create the console socket {sock_path}: {e.strerror or e}") from e
    listener.set_inheritable(True)
    return listener, client


def expect_ready(
    sock: socket.socket, marker: str, timeout: float, *, abort: Callable[[], str | None]
) -> float:
    """Follow the console on `sock` (from `listen`) with pexpect until `marker`.

    The whole boot passes through this connection. A kernel panic or QEMU
    exiting ends the wait at once (VMError); the timeout raises TimeoutError.
    """
    # Here, not at the top: pexpect costs ~20 ms CPU on every `vmctl` start-up (measured).
    from pexpect import EOF, TIMEOUT, fdpexpect

    began = time.monotonic()
    try:
        child = fdpexpect.fdspawn(sock.fileno(), timeout=0.5, maxread=65536)
        patterns = [marker.encode(), *(p.encode() for p in FATAL), EOF, TIMEOUT]
        while True:
            i = child.expect(patterns)
            if i == 0:
                return time.monotonic() - began
            if i <= len(FATAL):
                line = child.after.decode(errors="replace").strip()
                raise VMError(f"the guest's kernel failed: {line}")
            if i == len(FATAL) + 1:  # EOF: QEMU closed the console
                raise VMError(_gone(abort) or "the console closed")
            reason = abort()
            if reason:
                raise VMError(reason)
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"{marker} not seen within {timeout:.0f} s")
    except TimeoutError:
        raise  # an OSError too, but not a console failure
    except OSError as e:  # a QEMU that failed at start resets the queued connection
        raise VMError(_gone(abort) or f"lost the console: {e.strerror or e}") from e


def _gone(abort: Callable[[], str | None], wait: float = 2.0) -> str | None:
    """Why QEMU went, once it has: its sockets close a moment before it can be reaped."""
    try:
        return wait_until(abort, timeout=wait, what="QEMU's exit", interval=0.02)
    except Timeout:
        return None


def attach(
    sock_path: Path,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    *,
    stop_on_exit: bool = False,
    name: str = "NAME",
) -> str:
    """Join the serial console interactively; why it ended.

    Returns "detached" (Ctrl-]), "closed" (the guest went away) or, with
    `stop_on_exit`, "exited": the console's login shell exited (the guest
    prints the contract's console_exit_marker). Without it the guest starts
    a new shell and a line here says how to detach or stop. An Enter is sent
    on attach so the guest's shell shows a fresh prompt at once.
    """
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(str(sock_path))
    except OSError as e:
        sock.close()
        raise VMError(f"cannot attach to the console: {e}", "is another console attached?") from e
    saved = termios.tcgetattr(stdin_fd) if os.isatty(stdin_fd) else None
    try:
        if saved is not None:
            tty.setraw(stdin_fd)
        sock.sendall(b"\r")
        note = RESPAWN_NOTE.format(name=name).encode()
        return _copy_loop(sock, stdin_fd, stdout_fd, None if stop_on_exit else note)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        sock.close()


def _copy_loop(sock: socket.socket, stdin_fd: int, stdout_fd: int, note: bytes | None) -> str:
    """Copy both ways; on the console-exit marker return, or print `note` and go on."""
    watch: list[int | socket.socket] = [sock, stdin_fd]
    # \036 first: the guest prints it, a person echoing the word does not.
    marker = b"\x1e" + contract.raw()["console"]["console_exit_marker"].encode()
    tail = b""
    while True:
        ready, _, _ = select.select(watch, [], [])
        if sock in ready:
            data = sock.recv(65536)
            if not data:
                return "closed"
            os.write(stdout_fd, data)
            seen, tail = tail + data, (tail + data)[-len(marker) :]
            if marker in seen:
                if note is None:
                    return "exited"
                tail = b""
                os.write(stdout_fd, b"\r\n" + note + b"\r\n")
        if stdin_fd in ready:
            data = os.read(stdin_fd, 1024)
            if not data:
                watch.remove(stdin_fd)
                continue
            if DETACH_KEY in data:
                sock.sendall(data.split(DETACH_KEY, 1)[0])
                return "detached"
            sock.sendall(data)
