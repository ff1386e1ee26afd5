"""Bring the model endpoint into a sandbox that has no network.

On Linux a sandboxed client lives in its own network namespace with only a
loopback device, so it cannot reach the model at 127.0.0.1:8080 on the
host. vmctl bridges just that one endpoint in, over a UNIX socket:

    client -> 127.0.0.1:PORT (inside) -> ep.sock -> HostRelay -> endpoint

`HostRelay` runs in the vmctl process on the host and forwards each
connection on the socket to the endpoint, audited as the client (one
event record, vmctl.events). Inside the sandbox this file runs as a script (stdlib only, so
it needs nothing but the interpreter and its standard library)::

    python3 -I -S bridge.py --listen 127.0.0.1:PORT --socket ep.sock -- CLIENT ARGS...

It listens, then runs the client as its child and exits with its status.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

BUFSIZE = 65536
CONNECT_TIMEOUT = 5.0
#: Connections one bridge serves at once (a guest's sidecar allows 32 by default).
MAX_CONNS = 64


def _pump(src: socket.socket, dst: socket.socket, seen: Callable[[bytes], None]) -> None:
    """Copy src to dst until EOF, then half-close dst so the peer sees EOF."""
    try:
        while True:
            data = src.recv(BUFSIZE)
            if not data:
                break
            seen(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def splice(a: socket.socket, b: socket.socket, seen: Callable[[bytes], None]) -> int:
    """Forward both ways until both sides are done; returns bytes sent b->a."""
    down = [0]

    def count(data: bytes) -> None:
        down[0] += len(data)

    t = threading.Thread(target=_pump, args=(b, a, count), daemon=True)
    t.start()
    _pump(a, b, seen)
    t.join()
    for s in (a, b):
        with contextlib.suppress(OSError):
            s.close()
    return down[0]


class _Acceptor:
    """Accept loop in a daemon thread; each connection handled in its own thread.

    At most MAX_CONNS at once (a thread and two buffers each): past that a
    connection is closed at once and `refused` says so.
    """

    def __init__(
        self,
        listener: socket.socket,
        handle: Callable[[socket.socket], None],
        refused: Callable[[], None] = lambda: None,
    ):
        self.listener = listener
        self.handle = handle
        self.refused = refused
        self.slots = threading.BoundedSemaphore(MAX_CONNS)
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self.slots.acquire(blocking=False):
                conn.close()
                self.refused()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        finally:
            self.slots.release()

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.listener.close()


class HostRelay:
    """UNIX socket -> the endpoint, audited as the client `who` (vmctl.events).

    To a vmctl server it takes the gateway's route for `who`, and the
    gateway writes each request's event; to any other endpoint it writes
    one `request` event per request line itself (keep-alive included).
    Either way each connection ends with a `connection` event: bytes each
    way, duration, how many requests. A client with no valid name is not
    audited here (the gateway still sees it as the host). Its vmctl imports
    sit inside the methods: this file also runs, stdlib only, in the sandbox.
    """

    def __init__(self, socket_path: Path, host: str, port: int, who: str = ""):
        self.socket_path = socket_path
        self.target = (host, port)
        self.who = who if _valid_caller(who) else ""  # the gateway's route audits it by name
        self._log: Any = None
        self._acceptor: _Acceptor | None = None

    def start(self) -> HostRelay:
        if self.who:
            from vmctl import events, paths

            where = events.subject_file(paths.events_dir(), "client", self.who)
            self._log = events.EventLog(where)
        self.socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            listener.bind(str(self.socket_path))
        finally:
            os.umask(old)
        listener.listen(64)
        self._acceptor = _Acceptor(listener, self._handle, self._refused)
        self._acceptor.start()
        return self

    def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> HostRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, conn: socket.socket) -> None:
        from vmctl import events
        from vmctl.sidecars.httpclock import RequestClock

        start = time.monotonic()
        where = {"host": self.target[0], "port": self.target[1]}
        try:
            upstream, routed = self._connect()
        except OSError as e:
            conn.close()
            detail = events.safe(str(e))[:200]
            self._event(
                "connection", "refuse", decision="deny", reason="upstream_unreachable",
                detail=detail, **where,
            )  # fmt: skip
            return
        clock = RequestClock(None if routed else self._request_seen)
        down = splice(conn, upstream, lambda data: clock.feed(data, time.monotonic()))
        self._event(
            "connection", "close", decision="allow", bytes_up=clock.bytes_up, bytes_down=down,
            duration_ms=round((time.monotonic() - start) * 1000, 1),
            detail=f"{clock.requests} requests" + ("" if routed else " (unrouted)"), **where,
        )  # fmt: skip

    def _refused(self) -> None:
        self._event("connection", "refuse", decision="deny", reason="too_many_connections",
                    detail=f"{MAX_CONNS} open")  # fmt: skip

    def _request_seen(self, method: str, path: str) -> None:
        """An endpoint with no gateway in front: the request line is audited here."""
        self._event("request", f"{method} {path}", method=method, path=path, decision="allow")

    def _event(self, kind: str, action: str, **fields: Any) -> None:
        if self._log is None:
            return
        from vmctl.events import Event

        with contextlib.suppress(OSError):
            self._log.write(Event(kind, "client", self.who, "bridge", action, **fields))

    def _connect(self) -> tuple[socket.socket, bool]:
        """The gateway's route for this client when a vmctl server serves it, else TCP."""
        from vmctl import routes

        route = routes.find_route(*self.target) if self.who else None
        if route is None:
            upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
        else:
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.settimeout(CONNECT_TIMEOUT)
            upstream.connect(str(route))
            upstream.sendall(routes.preamble("client", self.who))
        upstream.settimeout(None)
        return upstream, route is not None


def _valid_caller(name: str) -> bool:
    from vmctl import routes

    try:
        routes.preamble("client", name)
    except ValueError:
        return False
    return True


def _listen_tcp(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(64)
    return listener


def _to_socket(path: str) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(path)
        except OSError:
            conn.close()
            upstream.close()
            return
        splice(conn, upstream, lambda _data: None)

    return handle


def run_child(argv: list[str], stderr: TextIO = sys.stderr) -> int:
    """Run the client, passing on terminal signals; its exit status, shell-style."""
    try:
        child = subprocess.Popen(argv)
    except OSError as e:
        print(f"vmctl bridge: cannot run {argv[0]}: {e.strerror}", file=stderr)
        return 127
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    code = child.wait()
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--" not in args:
        print("usage: bridge.py --listen HOST:PORT --socket PATH -- CMD...", file=sys.stderr)
        return 2
    i = args.index("--")
    p = argparse.ArgumentParser(prog="bridge.py")
    # Repeatable in pairs: the model endpoint, and the egress proxy under --policy.
    p.add_argument("--listen", required=True, action="append")
    p.add_argument("--socket", required=True, action="append")
    a = p.parse_args(args[:i])
    cmd = args[i + 1 :]
    if not cmd or len(a.listen) != len(a.socket):
        print("vmctl bridge: one --socket per --listen, then -- CMD", file=sys.stderr)
        return 2
    for address, path in zip(a.listen, a.socket, strict=True):
        try:
            listener = _listen_tcp(address)
        except (OSError, ValueError) as e:
            print(f"vmctl bridge: cannot listen on {address}: {e}", file=sys.stderr)
            return 1
        _Acceptor(listener, _to_socket(path)).start()
    return run_child(cmd)


if __name__ == "__main__":
    sys.exit(main())
