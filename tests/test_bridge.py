"""`vmctl run`'s host-client bridge (vmctl.sidecars.bridge): named by its route
at a vmctl gateway, audited request by request at a plain endpoint, and bounded.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from gateway_peer import REQ, home, read_until_closed, served
from vmctl import events

__all__ = ["home", "served"]  # fixtures, used by name


async def test_a_bridged_host_client_is_named_by_its_route(home: Path, served: int) -> None:
    """`vmctl run`'s bridge takes the same kind of route: the gateway names the client."""
    from vmctl.sidecars.bridge import HostRelay

    sock = home / "ep.sock"
    with HostRelay(sock, "127.0.0.1", served, who="opencode"):
        c = socket.socket(socket.AF_UNIX)
        await asyncio.get_running_loop().sock_connect(c, str(sock))
        c.sendall(REQ[:-2] + b"Connection: close\r\n\r\n")
        assert (await read_until_closed(c)).startswith(b"HTTP/1.1 200")
        c.close()
    log = home / "events" / "client-opencode.jsonl"
    deadline = time.monotonic() + 10  # the bridge's own line comes once the gateway hangs up
    while "connection" not in log.read_text() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    (e, c) = events.read_file(log)
    assert (e.kind, e.who_kind, e.who, e.server, e.status) == (
        "request",
        "client",
        "opencode",
        "s1",
        200,
    )
    assert (c.kind, c.by, c.detail) == ("connection", "bridge", "1 requests")


def test_a_bridged_client_on_a_plain_endpoint_is_audited_request_by_request(home: Path) -> None:
    """No gateway in front: the bridge writes each keep-alive request's event."""
    import http.server
    import threading

    from vmctl.sidecars.bridge import HostRelay

    class Plain(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sock = home / "ep.sock"
    try:
        with HostRelay(sock, "127.0.0.1", server.server_address[1], who="llm"):
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(sock))
            c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.recv(4096).startswith(b"HTTP/1.1 200")
            c.sendall(b"GET /v1/a\x1b]2;x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while c.recv(4096):
                pass
            c.close()
            deadline = time.monotonic() + 10
            path = home / "events" / "client-llm.jsonl"
            while time.monotonic() < deadline and "connection" not in (
                path.read_text() if path.exists() else ""
            ):
                time.sleep(0.05)
    finally:
        server.shutdown()
        server.server_close()
    found = list(events.read_file(path))
    assert [(e.kind, e.who_kind, e.who, e.by) for e in found] == [
        ("request", "client", "llm", "bridge"),
        ("request", "client", "llm", "bridge"),
        ("connection", "client", "llm", "bridge"),
    ]
    assert found[0].path == "/v1/models" and found[2].detail == "2 requests (unrouted)"
    assert int(found[2].bytes_down or 0) > 0


def test_a_bridged_client_holding_too_many_connections_is_refused_and_audited(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each held connection costs vmctl a thread: past the cap they are closed, audited."""
    from vmctl.sidecars import bridge

    monkeypatch.setattr(bridge, "MAX_CONNS", 3)
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(16)  # accepts, never answers: the client's connections stay open
    held: list[socket.socket] = []
    sock = home / "ep.sock"
    try:
        with bridge.HostRelay(sock, "127.0.0.1", upstream.getsockname()[1], who="llm"):
            for _ in range(5):
                c = socket.socket(socket.AF_UNIX)
                c.connect(str(sock))
                held.append(c)
            log = home / "events" / "client-llm.jsonl"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (
                not log.exists() or log.read_text().count("too_many_connections") < 2
            ):
                time.sleep(0.05)
            refused = [e for e in events.read_file(log) if e.action == "refuse"]
            assert [(e.reason, e.who) for e in refused] == [("too_many_connections", "llm")] * 2
            for c in held[3:]:  # the refused two were closed at once
                c.settimeout(5)
                assert c.recv(1) == b""
            for c in held[:3]:  # the first three are still carried
                c.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    c.recv(1)
    finally:
        for c in held:
            c.close()
        upstream.close()
