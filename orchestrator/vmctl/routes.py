"""How vmctl's own sidecars reach the gateway with a name the caller cannot forge.

The gateway listens on a UNIX socket in the server's private runtime
folder (0700, socket 0600), which only the user's own processes can
reach: a guest reaches it only through its sidecar, a sandboxed client
only through its bridge. The sidecar opens each connection with one line,
`VMCTL-ROUTE guest NAME\\n`, before any byte of the caller's; after it the
connection is plain HTTP, handed to the gateway, which records that name
as `who` for every request on it (keep-alive and pipelined ones included).
A header the guest writes never names the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from vmctl import paths
from vmctl.procs import ProcessRef
from vmctl.state import StateError, read_json

PREAMBLE = b"VMCTL-ROUTE"
PREAMBLE_MAX = 128
PREAMBLE_TIMEOUT_S = 5.0
_LINE_RE = re.compile(rb"^VMCTL-ROUTE (guest|client) ([a-z0-9][a-z0-9._-]{0,39})$")

Attach = Callable[[asyncio.BaseTransport, tuple[str, str]], asyncio.Protocol]


def preamble(who_kind: str, name: str) -> bytes:
    """The first line a sidecar sends; refused names never leave here."""
    line = f"VMCTL-ROUTE {who_kind} {name}".encode()
    if not _LINE_RE.match(line):
        raise ValueError(f"invalid route caller {who_kind} {name!r}")
    return line + b"\n"


def parse(line: bytes) -> tuple[str, str] | None:
    m = _LINE_RE.match(line.rstrip(b"\r"))
    return (m.group(1).decode(), m.group(2).decode()) if m else None


class _Preamble(asyncio.Protocol):
    """Reads the route line, then gives the transport to the HTTP protocol."""

    def __init__(self, attach: Attach):
        self.attach = attach
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(PREAMBLE_TIMEOUT_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        end = self.buf.find(b"\n")
        if end < 0:
            if len(self.buf) > PREAMBLE_MAX:
                self.transport.abort()
            return
        who = parse(self.buf[:end])
        if self.timer is not None:
            self.timer.cancel()
        if who is None:
            self.transport.abort()
            return
        rest, self.buf = self.buf[end + 1 :], b""
        protocol = self.attach(self.transport, who)
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if rest:
            protocol.data_received(rest)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


async def listen(path: Path, attach: Attach) -> asyncio.Server:
    """Listen on `path` (replacing a stale socket), private to this user."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old = os.umask(0o177)
    try:
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: _Preamble(attach), path=str(path), backlog=256
        )
    finally:
        os.umask(old)
    return server


def find_route(host: str, port: int) -> Path | None:
    """The routes socket of the running `vmctl serve` that listens on host:port, if any."""
    with contextlib.suppress(OSError):
        for root in sorted(paths.servers_dir().iterdir()):
            sp = paths.ServerPaths(root)
            try:
                meta = read_json(sp.meta, {"port": int, "supervisor": dict})
                alive = ProcessRef.from_json(meta["supervisor"]).alive()
            except (StateError, ValueError):
                continue
            if alive and meta["port"] == port and meta.get("host") in (host, "0.0.0.0"):
                with contextlib.suppress(OSError, Exception):
                    if sp.routes.exists():
                        return sp.routes
    return None
