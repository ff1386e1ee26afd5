"""The egress proxy: CONNECT and plain HTTP, each attempt decided by vmctl.egress.

One proxy serves one caller (a guest or a `vmctl run` client), so its
connection cap is that caller's. Per connection it reads one request head
(bounded size and time), decides by name and then by every address the
name resolves to (it resolves names itself, `--resolve` first), connects to
an address it checked (so a second DNS answer cannot swap it), and then
copies bytes both ways with fixed-size reads and flow control until both
sides are done or the connection idles out. TLS inside CONNECT is passed
through untouched. A refusal is a 403 whose body names the rule; every
attempt, allowed or not, is one `Event` of kind `egress`.

Rules are read again for every connection: a rule added while the guest
runs applies to its next connection.

Hosting: `ProxyThread` runs it on a UNIX socket inside vmctl (for `vmctl
run`); `python -m vmctl.sidecars.proxy` runs it as a guest's sidecar, fed
by the guestfwd connector (vmctl.sidecars.proxy_connect), which hands over
each guest connection's socket and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmctl import egress, events, routes
from vmctl.errors import ConfigError

HEAD_MAX = 16384
CHUNK = 65536
HEAD_TIMEOUT_S = 10.0
RESOLVE_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 120.0
MAX_CONNECTIONS = 32
_HOP_HEADERS = {b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive"}


@dataclass
class Attempt:
    """What one connection asked for and what became of it (one Event)."""

    action: str = "connect"
    method: str | None = None
    path: str | None = None
    host: str | None = None
    port: int | None = None
    address: str | None = None
    decision: str | None = None
    rule: str | None = None
    status: int | None = None
    reason: str | None = None
    up: int = 0
    down: int = 0
    started: float = field(default_factory=time.monotonic)


class Refused(Exception):
    def __init__(self, status: int, reason: str, rule: str | None = None):
        super().__init__(reason)
        self.status, self.reason, self.rule = status, reason, rule


@dataclass
class ProxyConfig:
    who_kind: str  # guest | client
    who: str
    preset: str
    resolve: dict[str, list[str]] = field(default_factory=dict)
    events_dir: Path | None = None
    max_connections: int = MAX_CONNECTIONS
    idle_timeout: float = IDLE_TIMEOUT_S
    #: The model endpoint, and the address the caller knows it by (10.0.2.2:8080
    #: in a guest): a client that ignores NO_PROXY still reaches the model.
    model: tuple[str, int] | None = None
    model_as: tuple[str, int] | None = None


class EgressProxy:
    def __init__(self, config: ProxyConfig):
        self.config = config
        egress.preset(config.preset)  # an unknown preset fails here, not per connection
        self.active = 0
        log_dir = config.events_dir
        self.log = (
            events.EventLog(events.subject_file(log_dir, config.who_kind, config.who))
            if log_dir is not None
            else None
        )

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection; always leaves one event."""
        att = Attempt()
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.active >= self.config.max_connections:
                att.decision = "deny"
                raise Refused(503, f"over {self.config.max_connections} connections", "limit")
            self.active += 1
            try:
                up_reader, upstream = await self._open(reader, writer, att)
                await self._splice(reader, writer, up_reader, upstream, att)
            finally:
                self.active -= 1
        except Refused as r:
            att.status, att.reason, att.rule = r.status, r.reason, r.rule or att.rule
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(_refusal(r, att))
                await asyncio.wait_for(writer.drain(), 5.0)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
            att.reason = att.reason or f"{type(e).__name__}: {e}"
        finally:
            self._record(att)  # before closing: the caller's EOF means the line is there
            for w in (writer, upstream):
                if w is not None:
                    with contextlib.suppress(OSError, RuntimeError):
                        w.close()

    async def _open(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, att: Attempt
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            raise Refused(431, f"request head over {HEAD_MAX} bytes") from None
        except TimeoutError:
            raise Refused(408, "no request head in time") from None
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise Refused(400, "not an HTTP/1.x proxy request")
        method, target, version = parts
        att.method = method
        if method == "CONNECT":
            host, port = _authority(target, None)
        else:
            att.action = "http"
            if not target.lower().startswith("http://"):
                raise Refused(400, "only CONNECT and absolute http:// URLs go through the proxy")
            authority, _, rest = target[7:].partition("/")
            host, port = _authority(authority, 80)
            att.path = "/" + rest
        att.host, att.port = host, port
        if self.config.model is not None and (host, port) == self.config.model_as:
            att.decision, att.rule = "allow", "model: the caller's model endpoint"
            up_reader, up_writer = await self._connect_model(att)
        else:
            addresses = await self._decide(host, port, att)
            up_reader, up_writer = await self._connect(addresses, port, att)
        if method == "CONNECT":
            writer.write(f"{version} 200 Connection established\r\n\r\n".encode())
            att.status = 200
        else:
            out = _origin_head(method, att.path or "/", version, lines[1:])
            up_writer.write(out)
            att.up += len(out)
        return up_reader, up_writer

    async def _decide(self, host: str, port: int, att: Attempt) -> list[str]:
        """The addresses this attempt may reach; Refused(403) naming the rule otherwise."""
        try:
            policy = egress.policy_for(self.config.who, self.config.preset)
        except ConfigError as e:  # fail closed on a broken rules file
            att.decision = "deny"
            raise Refused(403, e.message, "error: the rules file is unreadable") from None
        literal = _ip(host)
        by_name = None if literal else policy.check_name(host, port)
        if by_name is not None and not by_name.allowed:
            return self._deny(att, by_name)
        if literal is not None:
            candidates = [literal]
        else:
            candidates = await self._resolve(host, port, att)
        allowed: list[str] = []
        first: egress.Decision | None = None
        for addr in candidates:
            d = policy.check_address(addr, port, by_name)
            if d.allowed:
                allowed.append(str(addr))
                att.rule = att.rule or d.rule
            first = first or (None if d.allowed else d)
        if not allowed:
            att.address = str(candidates[0])
            assert first is not None
            return self._deny(att, first)
        att.decision = "allow"
        return allowed

    def _deny(self, att: Attempt, d: egress.Decision) -> list[str]:
        att.decision, att.rule = "deny", d.rule
        raise Refused(403, f"egress policy denies {att.host}:{att.port}", d.rule)

    async def _resolve(self, host: str, port: int, att: Attempt) -> list[egress.IPAddress]:
        fixed = self.config.resolve.get(host)
        if fixed:
            return [ipaddress.ip_address(a) for a in fixed]
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
            )
        except (TimeoutError, OSError):
            att.decision = "deny"
            raise Refused(502, f"cannot resolve {host}", "error: name does not resolve") from None
        out: list[egress.IPAddress] = []
        for info in infos:
            addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if addr not in out:
                out.append(addr)
        return out

    async def _connect_model(
        self, att: Attempt
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The model through the gateway's route naming this caller (vmctl.routes), as the
        guest sidecar does, so the gateway audits it as the caller's; else plain TCP."""
        assert self.config.model is not None
        host, port = self.config.model
        route = routes.find_route(host, port)
        if route is None:
            return await self._connect([host], port, att)
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_unix_connection(str(route), limit=CHUNK), CONNECT_TIMEOUT_S
            )
        except (TimeoutError, OSError):
            raise Refused(502, f"cannot connect to {att.host}:{att.port}") from None
        w.write(routes.preamble(self.config.who_kind, self.config.who))
        return r, w

    async def _connect(
        self, addresses: list[str], port: int, att: Attempt
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        for addr in addresses:
            att.address = addr
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                return await asyncio.wait_for(
                    asyncio.open_connection(addr, port, limit=CHUNK), CONNECT_TIMEOUT_S
                )
        raise Refused(502, f"cannot connect to {att.host}:{port}")

    async def _splice(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        att: Attempt,
    ) -> None:
        """Copy both ways until both are done; the idle timer spans both directions."""
        loop = asyncio.get_running_loop()
        last = [loop.time()]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await src.read(CHUNK):
                    last[0] = loop.time()
                    dst.write(data)
                    await dst.drain()  # flow control: never more than a chunk buffered
                    if up:
                        att.up += len(data)
                    else:
                        att.down += len(data)
            finally:
                # The caller's side is closed after the event is written, not here.
                with contextlib.suppress(OSError, RuntimeError):
                    if up and dst.can_write_eof():
                        dst.write_eof()

        tasks = [
            asyncio.ensure_future(pump(reader, up_writer, True)),
            asyncio.ensure_future(pump(up_reader, writer, False)),
        ]
        try:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if loop.time() - last[0] > self.config.idle_timeout:
                    att.reason = f"idle for {self.config.idle_timeout:.0f} s"
                    break
                if tasks[1].done():  # the destination is done answering
                    break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _record(self, att: Attempt) -> None:
        if self.log is None:
            return
        self.log.write(
            events.Event(
                kind="egress", who_kind=self.config.who_kind, who=self.config.who,
                by="proxy", action=att.action, method=att.method, path=att.path,
                status=att.status, host=att.host, port=att.port, address=att.address,
                decision=att.decision, rule=att.rule, reason=att.reason,
                bytes_up=att.up, bytes_down=att.down,
                duration_ms=round((time.monotonic() - att.started) * 1000, 1),
            )
        )  # fmt: skip


def _ip(host: str) -> egress.IPAddress | None:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]"))
    return None


def _authority(text: str, default_port: int | None) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); Refused(400) on anything odd."""
    if "@" in text:
        raise Refused(400, "credentials in the proxy target")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or _ip(host) is None or (rest and not rest.startswith(":")):
            raise Refused(400, "bad IPv6 authority")
    else:
        host, _, port_text = text.partition(":")
    if not port_text and default_port is None:
        raise Refused(400, "CONNECT needs host:port")
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise Refused(400, "bad port")
    port = int(port_text) if port_text else int(default_port or 0)
    if _ip(host) is None:
        try:
            host = egress.check_host(host, host)
        except ConfigError:
            raise Refused(400, "bad host name") from None
    return host, port


def _origin_head(method: str, path: str, version: str, headers: list[bytes]) -> bytes:
    """The request as the origin wants it: origin-form, no proxy headers, one request."""
    kept = [h for h in headers if h.split(b":", 1)[0].strip().lower() not in _HOP_HEADERS]
    lines = [f"{method} {path} {version}".encode(), *kept, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _refusal(r: Refused, att: Attempt) -> bytes:
    """A short plain-text answer; the body names the rule so an agent's error is useful."""
    words = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout",
             431: "Request Header Fields Too Large", 502: "Bad Gateway",
             503: "Service Unavailable"}  # fmt: skip
    body = f"vmctl: {r.reason}" + (f" (rule: {r.rule})" if r.rule else "") + "\n"
    head = f"HTTP/1.1 {r.status} {words.get(r.status, 'Error')}\r\n"
    head += "Content-Type: text/plain\r\nConnection: close\r\n"
    if r.rule:
        head += f"X-Vmctl-Rule: {events.safe(r.rule)}\r\n"
    data = body.encode("ascii", "replace")
    att.status = r.status
    return (head + f"Content-Length: {len(data)}\r\n\r\n").encode("ascii", "replace") + data
