"""Odd and hostile requests: each one answered, each one audited once, no traceback.

The gateway runs against a stand-in llama-server on a UNIX socket with small
bounds (1 KiB bodies, 2 requests in flight) so every refusal can be reached.
Requests are written as raw bytes, as an attacker would, and the events
written are counted against the requests sent.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from vmctl import events, routes
from vmctl.serve.gateway import Gateway, GatewayConfig

KEY = b"Host: m\r\nAuthorization: Bearer sekrit\r\n"


async def upstream(sock: Path, release: asyncio.Event) -> web.AppRunner:
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"ok": True, "usage": {"prompt_tokens": 1}})

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"slow": True})

    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"i": 0}\n\n')
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.abort()  # the model server dies mid-reply
        return resp

    app = web.Application()
    app.router.add_route("*", "/v1/chat/completions", chat)
    app.router.add_route("*", "/v1/messages", cut)
    app.router.add_get("/cut", cut)
    app.router.add_get("/slow", slow)
    app.router.add_get("/v1/models", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(sock)).start()
    return runner


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[tuple[int, Path, Path, asyncio.Event]]:
    release = asyncio.Event()
    runner = await upstream(tmp_path / "up.sock", release)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cfg = GatewayConfig(
        "127.0.0.1", port, tmp_path / "up.sock", tmp_path / "ev", api_key="sekrit",
        alias="m", name="serve-t", routes=tmp_path / "routes.sock", max_body=1024,
        max_in_flight=2, body_timeout=1.0,
    )  # fmt: skip
    gateway = Gateway(cfg)
    await gateway.start()
    yield port, tmp_path / "ev", tmp_path / "routes.sock", release
    release.set()
    await gateway.close()
    await runner.cleanup()


async def raw(port: int | Path, data: bytes, first: bytes = b"", wait: float = 3.0) -> bytes:
    """Send `data` (after `first`, the route line) and read until the peer closes."""
    if isinstance(port, Path):
        reader, writer = await asyncio.open_unix_connection(str(port))
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(first + data)
    await writer.drain()
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), wait):
            out += chunk
    except (TimeoutError, ConnectionError):
        pass
    writer.close()
    return out


def audit(folder: Path) -> list[events.Event]:
    return events.read_all(folder.glob("*.jsonl"))


HOSTILE: list[tuple[str, bytes, int]] = [
    ("not http", b"HELLO THERE\r\n\r\n", 1),
    ("bad version", b"GET / HTTP/9.9\r\n\r\n", 1),
    ("huge header", b"GET / HTTP/1.1\r\nX-A: " + b"a" * 20000 + b"\r\n\r\n", 1),
    (
        "bad chunking",
        b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
        + KEY
        + b"\r\nZZZ\r\nxx\r\n",
        1,
    ),
    (
        "non-utf8 key",
        b"GET /v1/models HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer \xff\r\n\r\n",
        1,
    ),
    ("no key", b"GET /v1/models HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n", 1),
    (
        "413 by length",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2000\r\n"
        + KEY
        + b"\r\n"
        + b"x" * 2000,
        1,
    ),
    (
        "413 chunked",
        b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
        + KEY
        + b"\r\n"
        + b"400\r\n"
        + b"x" * 1024
        + b"\r\n400\r\n"
        + b"y" * 1024
        + b"\r\n0\r\n\r\n",
        1,
    ),
    ("control bytes", b"GET /\x1b]2;pwned\x07 HTTP/1.1\r\n\r\n", 1),
    (
        "pipelined",
        (b"GET /v1/models HTTP/1.1\r\n" + KEY + b"\r\n") * 2
        + b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n"
        + KEY
        + b"\r\n",
        3,
    ),
    (
        "stalled body",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n" + KEY + b"\r\n{",
        1,
    ),
]


async def test_every_hostile_request_has_one_event_and_no_traceback(
    gw: tuple[int, Path, Path, asyncio.Event], capfd: pytest.CaptureFixture[str]
) -> None:
    port, folder, _, _ = gw
    expected = 0
    for what, data, n in HOSTILE:
        reply = await raw(port, data, wait=2.5)
        expected += n
        assert reply.startswith(b"HTTP/1."), what
        got = audit(folder)
        assert len(got) == expected, (what, [e.to_json() for e in got])
    by_status = [(e.status, e.reason) for e in audit(folder)]
    assert by_status.count((413, "body_too_large")) == 2
    assert (408, "body_timeout") in by_status
    assert by_status.count((401, "unauthorized")) == 2
    assert sum(1 for s, _ in by_status if s == 400) >= 4
    for e in audit(folder):
        assert not any(ord(c) < 0x20 for c in e.to_json()), e
    err = capfd.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) <= len(HOSTILE)


async def test_in_flight_limit_is_503_and_audited(
    gw: tuple[int, Path, Path, asyncio.Event],
) -> None:
    port, folder, _, release = gw
    hold = b"GET /slow HTTP/1.1\r\nConnection: close\r\n" + KEY + b"\r\n"
    held = [asyncio.create_task(raw(port, hold, wait=10)) for _ in range(2)]
    await asyncio.sleep(0.5)
    refused = await raw(port, hold, wait=2)
    assert refused.startswith(b"HTTP/1.1 503")
    assert json.loads(refused.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "server_error"
    release.set()
    for reply in await asyncio.gather(*held):
        assert reply.startswith(b"HTTP/1.1 200")
    statuses = sorted((e.status, e.reason) for e in audit(folder))
    assert statuses == [(200, None), (200, None), (503, "busy")]


async def test_a_client_that_hangs_up_frees_its_slot_and_is_audited(
    gw: tuple[int, Path, Path, asyncio.Event],
) -> None:
    """A plain (not streamed) request whose caller vanished stops waiting on the model."""
    port, folder, _, _ = gw
    hold = b"GET /slow HTTP/1.1\r\nConnection: close\r\n" + KEY + b"\r\n"
    gone = [asyncio.create_task(raw(port, hold, wait=0.3)) for _ in range(2)]  # the limit is 2
    assert await asyncio.gather(*gone) == [b"", b""]
    await asyncio.sleep(0.3)
    reply = await raw(port, b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n" + KEY + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply[:100]
    statuses = sorted((e.status or 0, e.reason or "") for e in audit(folder))
    assert statuses == [(200, ""), (499, "client_gone"), (499, "client_gone")]


async def test_route_names_the_guest_and_a_forged_header_is_ignored(
    gw: tuple[int, Path, Path, asyncio.Event],
) -> None:
    _, folder, route, _ = gw
    forged = b"X-Vmctl-Who: host\r\nX-Forwarded-For: 127.0.0.1\r\nX-Vmctl-Guest: other\r\n"
    req = b"GET /v1/models HTTP/1.1\r\n" + KEY + forged + b"\r\n"
    reply = await raw(route, req * 2, first=routes.preamble("guest", "box"), wait=1)
    assert reply.count(b"HTTP/1.1 200") == 2  # keep-alive: both answered
    got = audit(folder)
    assert [(e.who_kind, e.who, e.server) for e in got] == [("guest", "box", "serve-t")] * 2
    assert (folder / "guest-box.jsonl").exists()
    # A connection without the route line gets nothing and reaches nothing.
    assert await raw(route, req, wait=1) == b""
    assert await raw(route, req, first=b"VMCTL-ROUTE guest ../x\n", wait=1) == b""
    assert len(audit(folder)) == 2


@pytest.mark.parametrize(
    ("path", "marker"),
    [("/v1/chat/completions", b'data: {"error"'), ("/v1/messages", b"event: error\ndata: ")],
)
async def test_a_cut_stream_ends_with_an_error_event(
    gw: tuple[int, Path, Path, asyncio.Event], path: str, marker: bytes
) -> None:
    port, folder, _, _ = gw
    # The stand-in answers these as a stream it cuts (POST /v1/messages) or plainly.
    target = "/cut" if path.endswith("completions") else path
    req = f"{'GET' if target == '/cut' else 'POST'} {target} HTTP/1.1\r\n".encode()
    req += b"Content-Length: 2\r\n" + KEY + b"\r\n{}"
    reply = await raw(port, req, wait=3)
    assert b'data: {"i": 0}' in reply
    if target == "/cut":
        assert b'data: {"error"' in reply
    else:
        assert marker in reply and b'"type": "api_error"' in reply
    (e,) = audit(folder)
    assert e.reason == "upstream_error" and e.status == 200
