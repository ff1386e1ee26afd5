"""Talking to a guest: its log console and its framed exec channel.

Logs and commands travel on separate channels (style point 4). The serial
console (ttyS0) is for humans and markers: QEMU copies it to console.log,
which `wait_for_marker` follows, and `attach` joins it interactively. The
exec channel is a virtio-serial port with one request at a time:

    host:  <id> <base64 of a shell command>\\n
    guest: \\036VMCTL-BEGIN <id>\\n  output...  \\n\\036VMCTL-END <id> <status>\\n

The one newline before the END marker belongs to the frame, not the output.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import secrets
import select
import socket
import string
import termios
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

from vmctl.errors import VMError

DETACH_KEY = b"\x1d"  # Ctrl-]
ID_ALPHABET = string.ascii_letters + string.digits
LOCK_TIMEOUT_S = 300.0


def tail_lines(path: Path, n: int = 15) -> str:
    """The last `n` lines of a log, for error details ('' if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.rstrip("\r") for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


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


@contextlib.contextmanager
def locked(lock: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the instance's exec lock: one request at a time per guest."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VMError(
                        f"guest busy: another exec held {lock.parent.name} for {timeout:.0f} s"
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


class ExecChannel:
    """Client of the guest's `org.vmctl.exec` port (see the module docstring).

    QEMU's `pipe` chardev holds both FIFOs open, so opening them never
    blocks and a client that dies mid-command leaves only bytes behind,
    which the next client skips: it reads nothing until its own BEGIN.
    """

    def __init__(self, fifo_in: Path, fifo_out: Path, lock_path: Path, name: str = "guest"):
        self.fifo_in = fifo_in
        self.fifo_out = fifo_out
        self.lock_path = lock_path
        self.name = name

    def _open(self) -> tuple[int, int]:
        try:
            rfd = os.open(self.fifo_out, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise VMError(f"cannot reach the exec channel of {self.name}: {e.strerror}") from e
        try:
            wfd = os.open(self.fifo_in, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            os.close(rfd)
            raise VMError(f"exec channel of {self.name} is not open: is the guest running?") from e
        os.set_blocking(wfd, True)
        return rfd, wfd

    def run(
        self,
        command: str,
        on_output: Callable[[bytes], None],
        timeout: float | None = None,
    ) -> int:
        """Run `command` in the guest's shell, streaming output; its exit status."""
        req_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(16))
        line = f"{req_id} {base64.b64encode(command.encode()).decode()}\n".encode()
        deadline = None if timeout is None else time.monotonic() + timeout
        with locked(self.lock_path):
            rfd, wfd = self._open()
            try:
                os.write(wfd, line)
                return self._read_reply(rfd, req_id, on_output, deadline)
            finally:
                os.close(rfd)
                os.close(wfd)

    def _read_reply(
        self,
        rfd: int,
        req_id: str,
        on_output: Callable[[bytes], None],
        deadline: float | None,
    ) -> int:
        begin = f"\x1eVMCTL-BEGIN {req_id}\n".encode()
        end = f"\n\x1eVMCTL-END {req_id} ".encode()
        end_re = re.compile(re.escape(end) + rb"(-?[0-9]+)\r?\n")
        buf = b""
        started = False
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise VMError(f"command in {self.name} did not finish in time")
            ready, _, _ = select.select([rfd], [], [], left)
            if not ready:
                continue
            try:
                data = os.read(rfd, 65536)
            except BlockingIOError:
                continue
            if not data:  # no writer: QEMU is gone
                raise VMError(f"exec channel of {self.name} closed mid-command")
            buf += data
            if not started:
                at = buf.find(begin)
                if at < 0:
                    buf = buf[-len(begin) :]
                    continue
                buf, started = buf[at + len(begin) :], True
            m = end_re.search(buf)
            if m:
                if m.start():
                    on_output(buf[: m.start()])
                return int(m.group(1))
            keep = _partial_suffix(buf, end)
            if len(buf) > keep:
                on_output(buf[: len(buf) - keep])
                buf = buf[len(buf) - keep :]


def _partial_suffix(buf: bytes, marker: bytes) -> int:
    """How many trailing bytes of `buf` may belong to the END frame (held back)."""
    at = buf.rfind(marker)
    if at >= 0:
        return len(buf) - at
    for k in range(min(len(marker), len(buf)), 0, -1):
        if buf.endswith(marker[:k]):
            return k
    return 0


def attach(sock_path: Path, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
    """Join the serial console interactively until Ctrl-] or the guest goes away."""
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
        _copy_loop(sock, stdin_fd, stdout_fd)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        sock.close()


def _copy_loop(sock: socket.socket, stdin_fd: int, stdout_fd: int) -> None:
    watch: list[int | socket.socket] = [sock, stdin_fd]
    while True:
        ready, _, _ = select.select(watch, [], [])
        if sock in ready:
            data = sock.recv(65536)
            if not data:
                return
            os.write(stdout_fd, data)
        if stdin_fd in ready:
            data = os.read(stdin_fd, 1024)
            if not data:
                watch.remove(stdin_fd)
                continue
            if DETACH_KEY in data:
                sock.sendall(data.split(DETACH_KEY, 1)[0])
                return
            sock.sendall(data)
