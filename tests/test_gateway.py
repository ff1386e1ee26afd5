"""The gateway against a stand-in upstream on a UNIX socket.

These tests fake the peer, not the code: a small aiohttp app plays
llama-server on a UNIX socket so auth, streaming, hop-by-hop headers and
audit lines can be checked exactly and fast. The real llama-server path is
covered in test_serve.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import aiohttp
import pytest
from aiohttp import web

from vmctl import events
from vmctl.serve.gateway import Gateway, GatewayConfig, token_usage
from vmctl.serve.wire import authorized


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def upstream_app(sock: Path) -> web.AppRunner:
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(3):
                await resp.write(f'data: {{"i": {i}, "t": {time.monotonic()}}}\n\n'.encode())
                await asyncio.sleep(0.3)
            usage = {"prompt_tokens": 7, "completion_tokens": 3}
            await resp.write(f"data: {json.dumps({'usage': usage})}\n\ndata: [DONE]\n\n".encode())
            return resp
        seen = {
            k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-api-key")
        }
        return web.json_response(
            {
                "model": body.get("model"),
                "max_tokens": body.get("max_tokens"),
                "seen": seen,
                "usage": {"input_tokens": 5, "output_tokens": 2},
            }
        )

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(sock)).start()
    return runner


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    sock = tmp_path / "up.sock"
    runner = await upstream_app(sock)
    port = free_port()
    audit = tmp_path / "events"
    gw = Gateway(GatewayConfig("127.0.0.1", port, sock, audit, api_key="sekrit", alias="m1"))
    await gw.start()
    yield f"http://127.0.0.1:{port}", audit
    await gw.close()
    await runner.cleanup()


def audit_lines(folder: Path) -> list[dict[str, object]]:
    """Every event under `folder`, in time order, as plain dicts."""
    return [json.loads(e.to_json()) for e in events.read_all(folder.glob("*.jsonl"))]


async def test_api_key_enforced_for_bearer_and_x_api_key(gateway: tuple[str, Path]) -> None:
    url, audit = gateway
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/chat/completions", json={"model": "m1"}) as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "authentication_error"
        headers = {"Authorization": "Bearer sekrit"}
        async with s.post(f"{url}/v1/chat/completions", json={}, headers=headers) as r:
            assert r.status == 200
            # The key is stripped before reaching the model server.
            assert (await r.json())["seen"] == {}
        async with s.post(f"{url}/v1/messages", json={}, headers={"x-api-key": "sekrit"}) as r:
            assert r.status == 200
        async with s.post(f"{url}/v1/messages", json={}, headers={"x-api-key": "wrong"}) as r:
            assert r.status == 401
        async with s.get(f"{url}/health") as r:
            assert r.status == 200
    statuses = [(line["path"], line["status"]) for line in audit_lines(audit)]
    assert statuses == [
        ("/v1/chat/completions", 401),
        ("/v1/chat/completions", 200),
        ("/v1/messages", 200),
        ("/v1/messages", 401),
        ("/health", 200),
    ]


async def test_streaming_is_not_buffered_and_audited(gateway: tuple[str, Path]) -> None:
    url, audit = gateway
    arrivals = []
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer sekrit"}) as s:
        payload = {"model": "m1", "stream": True}
        async with s.post(f"{url}/v1/chat/completions", json=payload) as r:
            assert r.status == 200
            async for _chunk in r.content.iter_any():
                arrivals.append(time.monotonic())
    # Three events 0.3 s apart upstream must arrive spread out, not at once.
    assert arrivals[-1] - arrivals[0] >= 0.5
    (line,) = audit_lines(audit)
    assert line["model"] == "m1" and line["status"] == 200
    assert line["tokens_in"] == 7 and line["tokens_out"] == 3
    assert int(str(line["bytes_down"])) > 0 and int(str(line["bytes_up"])) > 0
    assert line["who_kind"] == "host" and line["server"] == "gateway"
    assert line["address"] == "127.0.0.1"  # the peer, so callers from several hosts differ


async def test_model_server_down_is_502(tmp_path: Path) -> None:
    port = free_port()
    gw = Gateway(GatewayConfig("127.0.0.1", port, tmp_path / "none.sock", tmp_path / "ev"))
    await gw.start()
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{port}/v1/models") as r,
        ):
            assert r.status == 502
    finally:
        await gw.close()
    (line,) = audit_lines(tmp_path / "ev")
    assert line["status"] == 502 and line["reason"] == "upstream_error"


async def test_port_in_use_raises(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        gw = Gateway(GatewayConfig("127.0.0.1", port, tmp_path / "x.sock", tmp_path / "ev"))
        with pytest.raises(OSError):
            await gw.start()


def test_token_usage_reads_openai_anthropic_and_timings() -> None:
    assert token_usage(b'{"usage": {"prompt_tokens": 4, "completion_tokens": 9}}') == {
        "prompt_tokens": 4,
        "completion_tokens": 9,
    }
    assert token_usage(b'data: {"usage":{"input_tokens":3,"output_tokens":1}}') == {
        "prompt_tokens": 3,
        "completion_tokens": 1,
    }
    assert token_usage(b"no usage here") == {}


def test_token_usage_reads_the_responses_api_nested_usage() -> None:
    """`/v1/responses`: usage nests `input_tokens_details`; timings count new tokens only."""
    completed = (
        b'data: {"type":"response.completed","response":{"usage":{"input_tokens":4566,'
        b'"output_tokens":27,"input_tokens_details":{"cached_tokens":4132}}},'
        b'"timings":{"prompt_n":434,"predicted_n":27}}\n\n'
    )
    assert token_usage(completed) == {"prompt_tokens": 4566, "completion_tokens": 27}


def test_authorized_compares_in_constant_time_semantics() -> None:
    class Req:
        path = "/v1/models"
        headers: ClassVar[dict[str, str]] = {"Authorization": "bearer k"}

    assert authorized(Req(), "k")  # type: ignore[arg-type]
    assert not authorized(Req(), "kk")  # type: ignore[arg-type]
    assert authorized(Req(), None)  # type: ignore[arg-type]


async def test_client_hanging_up_mid_stream_is_not_a_502(gateway: tuple[str, Path]) -> None:
    """A client that stops reading is the client's doing: audited as such, never 502."""
    url, audit = gateway
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer sekrit"}) as s:
        payload = {"model": "m1", "stream": True}
        async with s.post(f"{url}/v1/chat/completions", json=payload) as r:
            await r.content.readany()
            r.connection.transport.abort()  # type: ignore[union-attr]
    for _ in range(50):
        if audit_lines(audit):
            break
        await asyncio.sleep(0.1)
    (line,) = audit_lines(audit)
    assert line["status"] == 200
    assert line["reason"] == "client_gone"


async def test_the_ceiling_lowers_the_limit_upstream_and_bounds_what_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-output: llama-server sees the ceiling; a body too big to read whole is a 413."""
    from vmctl.serve import caps

    monkeypatch.setattr(caps, "MAX_CAPPED_BODY", 4096)
    sock = tmp_path / "up.sock"
    runner = await upstream_app(sock)
    port = free_port()
    gw = Gateway(GatewayConfig("127.0.0.1", port, sock, tmp_path / "ev", max_output=50))
    await gw.start()
    url = f"http://127.0.0.1:{port}/v1/messages"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json={"model": "m", "max_tokens": 9999}) as r:
                assert (r.status, (await r.json())["max_tokens"]) == (200, 50)
            async with s.post(url, json={"model": "m", "max_tokens": 20}) as r:
                assert (await r.json())["max_tokens"] == 20
            async with s.post(url, json={"model": "m", "pad": "x" * 5000}) as r:
                assert r.status == 413
                assert "4096" in (await r.json())["error"]["message"]
            # What all callers' bodies may hold at once is bounded too, and given back.
            monkeypatch.setattr(caps, "MAX_HELD", 1000)
            async with s.post(url, json={"model": "m", "pad": "x" * 2000}) as r:
                assert (r.status, r.headers.get("Retry-After")) == (503, "1")
            async with s.post(url, json={"model": "m", "max_tokens": 9}) as r:
                assert (r.status, (await r.json())["max_tokens"]) == (200, 9)
            assert gw.held.bytes == 0
    finally:
        await gw.close()
        await runner.cleanup()
    lines = events.read_all((tmp_path / "ev").glob("*.jsonl"))
    assert [(e.status, e.reason) for e in lines][-3:] == [
        (413, "body_too_large"),
        (503, "busy"),
        (200, None),
    ]
