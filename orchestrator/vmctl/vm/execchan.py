"""The exec channel's host side: one session per exec port, framed.

Kept apart from the console driver, with only small stdlib imports, because
`vmctl exec` is scripted in loops and its start-up is the round trip
(see vmctl.entry). The protocol is in docs/guest-contract.md, "Exec channel":
every frame is `type (1 byte) | length (2 bytes, big-endian) | payload`.

    host:  R <id>, A <command bytes>..., X "<flags> <rows> <cols> <TERM>",
           then 0 <stdin> (empty: EOF), W "<rows> <cols>", K "<signal>"
    guest: \\036VMCTL-BEGIN <id>\\n (unframed, to resynchronise), then
           1 <stdout>, 2 <stderr>, C "<stdin bytes consumed>", E "<status>"

Each host frame is one write of at most PIPE_BUF bytes, so a client that
dies mid-session leaves whole frames behind; the next client's R ends that
session and the guest's BEGIN marks where the new replies start. The host
sends stdin only within the window the guest has credited, and reads the
guest's frames into a buffer of one frame at most: neither side can make
the other buffer without bound.
"""

from __future__ import annotations

import fcntl
import os
import select
import time

from vmctl.errors import VMError

# `vmctl exec` start-up counts: no typing, pathlib or collections at run time
# (mypy takes any `TYPE_CHECKING` name as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    Sink = Callable[[bytes], None]
    StrPath = str | os.PathLike[str]

LOCK_TIMEOUT_S = 300.0
PIPE_BUF = 4096
HDR = 3
STDIN_WINDOW = 65536
READ_CHUNK = 65536
SETTLE_TIMEOUT_S = 2.0


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + len(payload).to_bytes(2, "big") + payload


class Tty:
    """A guest pty request: initial size, TERM, and a fd readable on resize."""

    def __init__(self, rows: int, cols: int, term: str, resize_fd: int | None = None):
        self.rows, self.cols, self.term = rows, cols, term
        self.resize_fd = resize_fd
        self.size: Callable[[], tuple[int, int]] = lambda: (self.rows, self.cols)


def _take_slot(locks: list[StrPath], timeout: float) -> tuple[int, int]:
    """Lock the first free session slot: (slot, lock fd). One client per port."""
    fds = [os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600) for p in locks]
    deadline = time.monotonic() + timeout
    try:
        while True:
            for i, fd in enumerate(fds):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                fds[i] = -1
                return i, fd
            if time.monotonic() > deadline:
                raise VMError(
                    f"guest busy: all {len(locks)} exec sessions held for {timeout:.0f} s"
                )
            time.sleep(0.02)
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)


class ExecChannel:
    """Client of the guest's exec ports (`org.vmctl.exec.N`, see the module docstring).

    Each slot is a FIFO pair that QEMU's `pipe` chardev holds open (so
    opening never blocks and the guest's port stays connected) and a lock
    file: a session takes the first free slot.
    """

    def __init__(
        self,
        slots: list[tuple[StrPath, StrPath, StrPath]],
        name: str = "guest",
        sidecar: StrPath | None = None,
        paused: StrPath | None = None,
    ):
        self.slots = slots
        self.name = name
        #: The guest sidecar's socket, asked to `settle` after each command.
        self.sidecar = sidecar
        #: The disk floor's marker: the guest is paused while it exists.
        self.paused_marker = paused

    def paused(self) -> bool:
        """Whether the disk floor holds the guest paused (a command waits until space is back)."""
        return self.paused_marker is not None and os.path.exists(self.paused_marker)

    def running(self) -> bool:
        """Whether QEMU holds the exec FIFOs open (a cheap liveness check, no pid files)."""
        if not self.slots:
            return False
        try:
            os.close(os.open(self.slots[0][0], os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError:
            return False  # ENXIO: no reader, QEMU is gone
        return True

    @classmethod
    def for_instance(cls, root: StrPath, name: str) -> ExecChannel:
        """The slots whose FIFOs exist in instance folder `root` (as vmctl.paths names them)."""
        slots: list[tuple[StrPath, StrPath, StrPath]] = []
        while os.path.exists((base := os.path.join(root, f"exec{len(slots)}")) + ".in"):
            slots.append((base + ".in", base + ".out", base + ".lock"))
        return cls(slots, name, os.path.join(root, "sidecar.sock"), os.path.join(root, "paused"))

    def _open(self, slot: int) -> tuple[int, int]:
        fifo_in, fifo_out, _ = self.slots[slot]
        try:
            rfd = os.open(fifo_out, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise VMError(f"cannot reach the exec channel of {self.name}: {e.strerror}") from e
        try:
            wfd = os.open(fifo_in, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            os.close(rfd)
            raise VMError(f"exec channel of {self.name} is not open: is the guest running?") from e
        return rfd, wfd

    def run(
        self,
        command: str,
        on_output: Sink,
        timeout: float | None = None,
        *,
        on_stderr: Sink | None = None,
        stdin: int | None = None,
        tty: Tty | None = None,
    ) -> int:
        """Run `command` with `sh -c` in the guest; its exit status.

        stdout goes to `on_output`, stderr to `on_stderr` (default: `on_output`);
        `stdin` is a readable fd forwarded to EOF (None: empty stdin).
        """
        if not self.slots:
            raise VMError(f"{self.name} has no exec port", "restart it with this vmctl")
        slot, lock = _take_slot([s[2] for s in self.slots], LOCK_TIMEOUT_S)
        try:
            rfd, wfd = self._open(slot)
            try:
                session = Session(rfd, wfd, self.name, on_output, on_stderr or on_output)
                if self.sidecar is not None:  # a host chmod just made: in the guest's view
                    settle(self.sidecar)
                status = session.run(command, stdin, tty, timeout)
                if self.sidecar is not None:  # the command's chmod: on the host on return
                    settle(self.sidecar)
                return status
            finally:
                os.close(rfd)
                os.close(wfd)
        finally:
            os.close(lock)


def settle(sock: StrPath, timeout: float = SETTLE_TIMEOUT_S) -> bool:
    """Ask the guest's sidecar to apply the workspace's pending x-bit changes.

    vmctl.sidecars.modes carries x bits from inotify events, and those are
    queued before the chmod that caused them returns (in the guest: before
    QEMU answers it). The sidecar answers once it has drained them, so a
    guest `chmod +x` made by the command is on the host when `vmctl exec`
    returns, and a host chmod made before it is seen by the command. Best
    effort: a missing or slow sidecar is ignored.
    """
    import _socket  # `socket` would import enum, selectors, ...: exec's start-up counts

    try:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(os.fspath(sock))
            s.sendall(b"settle")  # vmctl.sidecars.modes.SETTLE (not imported: start-up)
            return s.recv(8) == b"ok"
        finally:
            s.close()
    except OSError:
        return False


class Session:
    """One command on one port: the select loop over both directions."""

    def __init__(self, rfd: int, wfd: int, name: str, out: Sink, err: Sink):
        self.rfd, self.wfd, self.name = rfd, wfd, name
        self.out, self.err = out, err
        self.queue: list[bytes] = []
        self.credit = STDIN_WINDOW
        self.buf = b""
        self.status: int | None = None
        self.stdin: int | None = None
        self.begin = b""
        self.started = False

    def run(self, command: str, stdin: int | None, tty: Tty | None, timeout: float | None) -> int:
        req_id = os.urandom(8).hex()
        cmd = command.encode()
        step = PIPE_BUF - HDR
        self.queue = [frame(b"R", req_id.encode())]
        self.queue += [frame(b"A", cmd[i : i + step]) for i in range(0, len(cmd), step)]
        spec = f"t {tty.rows} {tty.cols} {tty.term or '-'}" if tty else "- 0 0 -"
        self.queue.append(frame(b"X", spec.encode()))
        if stdin is None:
            self.queue.append(frame(b"0"))
        self.begin = f"\x1eVMCTL-BEGIN {req_id}\n".encode()
        self.started = False
        deadline = None if timeout is None else time.monotonic() + timeout
        self.stdin = stdin
        interrupted = False
        while True:
            try:
                status = self._loop(tty, deadline)
                if status is not None:
                    return status
            except KeyboardInterrupt:
                if interrupted:  # the second Ctrl-C: give up on the command
                    self._send_now(frame(b"K", b"9"))
                    return 130
                interrupted = True
                self.queue.append(frame(b"K", b"2"))  # SIGINT to the command's group
            except BaseException:
                self._send_now(frame(b"K", b"9"))  # we stop reading: stop the command
                raise

    def _send_now(self, data: bytes) -> None:
        try:
            os.write(self.wfd, data)
        except OSError:
            return  # the guest's side is gone or full: nothing more to tell it

    def _loop(self, tty: Tty | None, deadline: float | None) -> int | None:
        while True:
            stdin = self.stdin
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise VMError(f"command in {self.name} did not finish in time")
            rlist = [self.rfd]
            if stdin is not None and self.credit > 0 and len(self.queue) < 2:
                rlist.append(stdin)
            if tty is not None and tty.resize_fd is not None:
                rlist.append(tty.resize_fd)
            wlist = [self.wfd] if self.queue else []
            ready_r, ready_w, _ = select.select(rlist, wlist, [], left)
            if ready_w:
                self._flush()
            if tty is not None and tty.resize_fd is not None and tty.resize_fd in ready_r:
                os.read(tty.resize_fd, 512)
                rows, cols = tty.size()
                self.queue.append(frame(b"W", f"{rows} {cols}".encode()))
            if stdin is not None and stdin in ready_r:
                data = os.read(stdin, min(self.credit, PIPE_BUF - HDR))
                self.credit -= len(data)
                self.queue.append(frame(b"0", data))
                if not data:
                    self.stdin = None
            if self.rfd in ready_r and self._receive():
                return self.status

    def _flush(self) -> None:
        """Write queued frames, as many whole ones per write as fit in PIPE_BUF."""
        while self.queue:
            chunk, k = self.queue[0], 1
            while k < len(self.queue) and len(chunk) + len(self.queue[k]) <= PIPE_BUF:
                chunk, k = chunk + self.queue[k], k + 1
            try:
                n = os.write(self.wfd, chunk)  # a FIFO takes <= PIPE_BUF whole or not at all
            except BlockingIOError:
                return
            if n < len(chunk):  # other byte streams (a pty in tests) may split it
                self.queue[:k] = [chunk[n:]]
                return
            del self.queue[:k]

    def _receive(self) -> bool:
        """Read and dispatch the guest's frames; True once the exit status came."""
        try:
            data = os.read(self.rfd, READ_CHUNK)
        except BlockingIOError:
            return False
        if not data:  # no writer: QEMU is gone
            raise VMError(f"exec channel of {self.name} closed mid-command")
        buf = self.buf + data
        if not self.started:
            at = buf.find(self.begin)
            if at < 0:
                self.buf = buf[-len(self.begin) :]
                return False
            buf, self.started = buf[at + len(self.begin) :], True
        off = 0
        while len(buf) - off >= HDR:
            n = int.from_bytes(buf[off + 1 : off + 3], "big")
            if len(buf) - off < HDR + n:
                break
            kind, payload = buf[off : off + 1], buf[off + HDR : off + HDR + n]
            off += HDR + n
            if kind == b"1":
                self.out(payload)
            elif kind == b"2":
                self.err(payload)
            elif kind == b"C":
                self.credit += int(payload or b"0")
            elif kind == b"E":
                self.status = int(payload or b"126")
                return True
        self.buf = buf[off:]
        return False
