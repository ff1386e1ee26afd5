"""The exec channel's host side: framed requests on the guest's exec port.

Kept apart from the console driver, with only small stdlib imports, because
`vmctl exec` is scripted in loops and its start-up is the round trip
(see vmctl.entry). The protocol is in docs/guest-contract.md:

    host:  <id> <base64 of a shell command>\\n
    guest: \\036VMCTL-BEGIN <id>\\n  output...  \\n\\036VMCTL-END <id> <status>\\n
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import secrets
import select
import string
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vmctl.errors import VMError

ID_ALPHABET = string.ascii_letters + string.digits
LOCK_TIMEOUT_S = 300.0


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
