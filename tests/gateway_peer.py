"""A real gateway registered as vmctl server `s1`, for the tests of what
connects to it through a route: the guest sidecar (test_guestpath) and the
host-client bridge (test_bridge). Its route socket is where they look for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from vmctl import paths
from vmctl.procs import ProcessRef
from vmctl.serve.gateway import Gateway, GatewayConfig

REQ = b"GET /v1/models HTTP/1.1\r\nHost: 10.0.2.2\r\nX-Vmctl-Who: host\r\n\r\n"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "h"
    monkeypatch.setenv("VMCTL_HOME", str(h))
    return h


@pytest.fixture
async def served(home: Path, tmp_path: Path) -> AsyncIterator[int]:
    """A gateway registered as server `s1` (its route socket where the sidecar looks)."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(tmp_path / "llama.sock")).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    sp = paths.server("s1")
    paths.private_dir(sp.root)
    paths.private_dir(sp.runtime)
    meta = {"name": "s1", "host": "127.0.0.1", "port": port}
    meta["supervisor"] = ProcessRef.of(os.getpid()).to_json()
    sp.meta.write_text(json.dumps(meta))
    cfg = GatewayConfig(
        "127.0.0.1", port, tmp_path / "llama.sock", paths.events_dir(), name="s1",
        routes=sp.routes,
    )  # fmt: skip
    gw = Gateway(cfg)
    await gw.start()
    yield port
    await gw.close()
    await runner.cleanup()


async def read_until_closed(sock: socket.socket, wait: float = 5) -> bytes:
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    out = b""
    try:
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), wait):
            out += chunk
    except (TimeoutError, ConnectionError):
        pass
    return out
