"""A stand-in llama-server for tests that need `vmctl serve` without a model.

Takes llama-server's command line (`--host PATH.sock`, `--alias`; the rest is
ignored) and answers on the UNIX socket as llama-server does: `/health`,
`/v1/models`, and chat completions (OpenAI) or messages (Anthropic), plain or
streamed. A stream sends `STANDIN_CHUNKS` events `STANDIN_DELAY` seconds
apart (0: as fast as it can, for the gateway's ceiling).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from aiohttp import web

CHUNKS = int(os.environ.get("STANDIN_CHUNKS", "20"))
DELAY = float(os.environ.get("STANDIN_DELAY", "0.05"))


def arg(name: str, default: str) -> str:
    argv = sys.argv[1:]
    return argv[argv.index(name) + 1] if name in argv else default


ALIAS = arg("--alias", "standin")


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def models(_: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": ALIAS, "object": "model"}]})


async def chat(request: web.Request) -> web.StreamResponse:
    try:
        body = json.loads(await request.read())
        assert isinstance(body, dict)
    except (ValueError, AssertionError, ConnectionError):  # as llama-server: 400, no traceback
        return web.json_response({"error": {"message": "invalid JSON", "code": 400}}, status=400)
    anthropic = request.path.startswith("/v1/messages")
    n = int(body.get("max_tokens") or CHUNKS)
    if not body.get("stream"):
        usage = {"prompt_tokens": 3, "completion_tokens": n}
        return web.json_response({"model": ALIAS, "choices": [], "usage": usage})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    piece = {"choices": [{"delta": {"content": "x"}}]}
    if anthropic:
        piece = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x"}}
    line = f"data: {json.dumps(piece)}\n\n".encode()
    for _ in range(n):
        await resp.write(line)
        if DELAY:
            await asyncio.sleep(DELAY)
    usage = {"usage": {"prompt_tokens": 3, "completion_tokens": n}}
    await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
    return resp


def main() -> None:
    sock = Path(arg("--host", "llama.sock"))
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", chat)
    web.run_app(app, path=str(sock), print=None, access_log=None)


if __name__ == "__main__":
    main()
