"""The exec channel's framing, both halves real, on a raw pty instead of a virtio port.

The guest half is vmctl-exec-mux built as the micro image builds it, started
through the shared agent script; the host half is vmctl.vm.execchan's
Session. Only the transport is a stand-in (a pty in raw mode is a byte
stream in both directions, like the port).
"""

from __future__ import annotations

import hashlib
import os
import pty
import shutil
import subprocess
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need
from vmctl.entry import instance_dir, quote_join
from vmctl.errors import VMError
from vmctl.images import micro
from vmctl.vm.execchan import STDIN_WINDOW, Session, Tty, frame

AGENT = Path(micro.__file__).parents[1] / "data" / "guest" / "vmctl-exec-agent.sh"


@pytest.fixture(scope="module")
def mux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(shutil.which("cc") is not None, "a C compiler (build-essential)")
    path = tmp_path_factory.mktemp("mux") / "vmctl-exec-mux"
    try:
        path.write_bytes(micro.build_exec_mux())
    except VMError as e:  # e.g. no static libc (the Nix build sandbox)
        need(False, f"{e.message}: {e.hint}")
    path.chmod(0o755)
    return path


class Peer:
    """The agent script and its mux serving one raw pty; `run` is one host session."""

    def __init__(self, mux: Path, tmp: Path) -> None:
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        ready = tmp / "ready"
        env = {**os.environ, "VMCTL_EXEC_MUX": str(mux)}
        argv = ["busybox", "sh", str(AGENT), str(ready), os.ttyname(self.slave)]
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "mux not ready"
            time.sleep(0.01)

    def run(
        self, command: str, stdin: int | None = None, tty: Tty | None = None
    ) -> tuple[int, bytes, bytes]:
        out: list[bytes] = []
        err: list[bytes] = []
        session = Session(self.master, self.master, "fake", out.append, err.append)
        status = session.run(command, stdin, tty, 30)
        return status, b"".join(out), b"".join(err)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def peer(mux: Path, tmp_path: Path) -> Iterator[Peer]:
    need(shutil.which("busybox") is not None, "busybox")
    p = Peer(mux, tmp_path)
    yield p
    p.close()


def feed(data: bytes) -> int:
    """A pipe whose other end a thread fills with `data`, then closes."""
    r, w = os.pipe()

    def write() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(data)

    threading.Thread(target=write, daemon=True).start()
    return r


def test_stdout_stderr_and_status_travel_apart(peer: Peer) -> None:
    assert peer.run("echo out; echo err >&2; exit 7") == (7, b"out\n", b"err\n")
    assert peer.run("printf 'no newline'") == (0, b"no newline", b"")
    assert peer.run("kill -9 $$")[0] == 137
    assert peer.run("cat") == (0, b"", b"")  # no stdin given: EOF at once
    status, _, err = peer.run("exec /nonexistent")
    assert status in (126, 127) and err


def test_a_pipe_session_starts_in_a_warm_shell_that_leaves_no_trace(peer: Peer) -> None:
    """After a session the mux starts the next shell ahead (a shell start is most of a
    `vmctl exec` under TCG); the command it sources sees only its stdio, as under sh -c."""
    assert peer.run("true")[0] == 0
    probe = "tr '\\0' ' ' </proc/$$/cmdline; [ -e /proc/self/fd/3 ] || echo closed"
    assert peer.run(probe) == (0, b"sh -c . /proc/self/fd/3 closed\n", b"")
    assert peer.run("exit 3")[0] == 3 and peer.run("(")[0] == 2
    assert peer.run("echo $0; read x; echo $x", stdin=feed(b"in\n"))[:2] == (0, b"sh\nin\n")


def test_stdin_is_forwarded_past_the_window(peer: Peer) -> None:
    """More stdin than the guest's window: the host waits for credit, nothing is lost."""
    data = os.urandom(5 * STDIN_WINDOW + 123)
    status, out, _ = peer.run("sha256sum", stdin=feed(data))
    assert status == 0 and out.split()[0].decode() == hashlib.sha256(data).hexdigest()
    # A command that reads part of its stdin and exits does not wait for the rest.
    start = time.monotonic()
    assert peer.run("head -c 5", stdin=feed(b"x" * 10 * STDIN_WINDOW))[:2] == (0, b"xxxxx")
    assert time.monotonic() - start < 10


def test_large_output_arrives_whole(peer: Peer) -> None:
    status, out, _ = peer.run("head -c 3000000 /dev/zero; echo end >&2")
    assert (status, len(out), set(out)) == (0, 3_000_000, {0})


def test_tty_session_has_size_term_and_resize(peer: Peer) -> None:
    resize_r, resize_w = os.pipe()
    t = Tty(30, 100, "xterm-256color", resize_r)
    status, out, err = peer.run("tty; stty size; echo $TERM; exit 4", tty=t)
    assert status == 4 and err == b""
    lines = out.decode().split("\r\n")
    assert lines[0].startswith("/dev/pts/") and lines[1:3] == ["30 100", "xterm-256color"]
    # A resize (the fd turns readable) before the command reads its line.
    t.size = lambda: (40, 120)
    os.write(resize_w, b"\x1c")
    status, out, _ = peer.run("read x; stty size; echo got $x", stdin=feed(b"hi\n"), tty=t)
    assert status == 0 and out.decode().split("\r\n")[-3:-1] == ["40 120", "got hi"]


def test_a_new_client_ends_a_dead_clients_session(peer: Peer) -> None:
    """A client that died mid-session left frames and a running command behind."""
    os.write(peer.master, frame(b"R", b"deadbeef00") + frame(b"A", b"sleep 61.25; echo late"))
    os.write(peer.master, frame(b"X", b"- 0 0 -") + frame(b"0", b"half of its std"))
    time.sleep(0.3)
    start = time.monotonic()
    assert peer.run("echo fresh") == (0, b"fresh\n", b"")
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 5  # SIGKILL is sent before "fresh" starts; allow delivery
    while any(b"61.25" in cmd for cmd in _cmdlines()):
        assert time.monotonic() < deadline, "the dead client's command still runs"
        time.sleep(0.1)


def _cmdlines() -> list[bytes]:
    out = []
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            out.append(proc.read_bytes())
        except OSError:
            continue  # gone meanwhile
    return out


def test_bad_requests_get_status_126(peer: Peer) -> None:
    status, _, err = peer.run("")
    assert status == 126 and b"no command" in err
    status, _, err = peer.run("echo " + "x" * (300 * 1024))
    assert status == 126 and b"too long" in err


def test_fast_path_helpers_agree_with_paths(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import shlex

    from vmctl import paths

    args = ["printf", "%s|", "a b", "it's", "", "$HOME", "ok-1.2"]
    assert quote_join(args) == shlex.join(args)
    assert instance_dir("box") == str(paths.instance("box").root)
    monkeypatch.delenv("VMCTL_HOME")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "st"))
    if os.uname().sysname == "Linux":
        assert instance_dir("box") == str(paths.instance("box").root)
    assert instance_dir("../x") is None and instance_dir("-x") is None


def test_host_skips_stale_bytes_and_holds_at_most_a_frame() -> None:
    """A fake guest: junk a dead client left, then 4 MiB of output in maximal frames."""
    import socket

    host, guest = socket.socketpair()
    sizes: list[int] = []

    class Watched(Session):
        def _receive(self) -> bool:
            done = super()._receive()
            sizes.append(len(self.buf))
            return done

    def fake_guest() -> None:
        f = guest.makefile("rb")
        kind, n = f.read(1), int.from_bytes(f.read(2), "big")
        assert kind == b"R"
        rid = f.read(n)
        guest.sendall(frame(b"1", b"stale output") + b"\x1eVMCTL-BEGIN deadbeef00\n" + b"junk")
        guest.sendall(b"\x1eVMCTL-BEGIN " + rid + b"\n")
        chunk = frame(b"1", b"y" * 65535)
        for _ in range(64):
            guest.sendall(chunk)
        guest.sendall(frame(b"E", b"0"))

    threading.Thread(target=fake_guest, daemon=True).start()
    got = [0]

    def count(data: bytes) -> None:
        got[0] += len(data)

    status = Watched(host.fileno(), host.fileno(), "fake", count, count).run("yes", None, None, 30)
    assert (status, got[0]) == (0, 64 * 65535)
    assert max(sizes) <= 65535 + 3
    host.close()
    guest.close()
