"""The audited HTTP gateway in front of a sandboxed llama-server.

llama-server listens on a UNIX socket inside its sandbox and has no
network at all; this gateway is the only way in. It listens on host:port,
enforces the API key (both `Authorization: Bearer` and `x-api-key`, with
`/health` public), forwards every route verbatim (OpenAI and Anthropic
Messages alike), streams responses chunk by chunk so SSE is never
buffered, and writes one JSON audit line per request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

# Headers that describe one hop, not the message (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
PUBLIC_PATHS = frozenset({"/health", "/v1/health"})
MAX_REQUEST_BYTES = 64 * 1024 * 1024
TAIL_BYTES = 64 * 1024
_USAGE_RE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*\})')
_TIMINGS_RE = re.compile(rb'"timings"\s*:\s*(\{[^{}]*\})')


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens, what it forwards to, and who may call it."""

    host: str
    port: int
    socket: Path
    audit: Path
    api_key: str | None = None
    alias: str | None = None


class AuditLog:
    """Append-only JSON lines; one line per request, flushed at once."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("a", encoding="utf-8")
        path.chmod(0o600)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def authorized(request: web.Request, api_key: str | None) -> bool:
    """True when no key is set, the path is public, or a header carries the key."""
    if api_key is None or request.path in PUBLIC_PATHS:
        return True
    offered = request.headers.get("x-api-key", "")
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        offered = offered or auth[7:].strip()
    return hmac.compare_digest(offered.encode(), api_key.encode())


def token_usage(body_tail: bytes) -> dict[str, int]:
    """Token counts from the last usage/timings object in a response.

    Works for plain JSON and for SSE streams (the final event carries the
    usage), OpenAI (`prompt_tokens`) and Anthropic (`input_tokens`) alike.
    """
    found: dict[str, int] = {}
    for regex in (_TIMINGS_RE, _USAGE_RE):
        matches = regex.findall(body_tail)
        if not matches:
            continue
        try:
            obj = json.loads(matches[-1])
        except ValueError:
            continue
        for src, dst in (
            ("prompt_tokens", "prompt_tokens"),
            ("input_tokens", "prompt_tokens"),
            ("prompt_n", "prompt_tokens"),
            ("completion_tokens", "completion_tokens"),
            ("output_tokens", "completion_tokens"),
            ("predicted_n", "completion_tokens"),
        ):
            value = obj.get(src)
            if isinstance(value, int) and value > 0:
                found[dst] = value
    return found


def request_model(body: bytes) -> str | None:
    if not body.startswith(b"{"):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def _error(status: int, message: str, kind: str) -> web.Response:
    """Errors in OpenAI's shape, which Anthropic clients also display."""
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status)


class Gateway:
    """An aiohttp app that forwards to llama-server's UNIX socket."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.audit = AuditLog(config.audit)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind host:port; raises OSError when the port is taken."""
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.audit.close()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.UnixConnector(path=str(self.config.socket), limit=0)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False
            )
        return self._session

    async def handle(self, request: web.Request) -> web.StreamResponse:
        start = time.monotonic()
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "peer": request.remote,
            "method": request.method,
            "path": request.path_qs,
        }
        body = b""
        response: web.StreamResponse
        tail = b""
        try:
            if not authorized(request, self.config.api_key):
                response = _error(401, "invalid or missing API key", "authentication_error")
            else:
                body = await request.read()
                record["model"] = request_model(body) or self.config.alias
                response, tail, client_gone = await self._forward(request, body)
                if client_gone:
                    record["client_gone"] = True
        except (aiohttp.ClientError, OSError) as e:
            response = _error(502, f"model server unavailable: {e}", "server_error")
        except asyncio.CancelledError:
            record["status"] = 499  # the client went away mid-response
            self._finish(record, body, 0, start, b"")
            raise
        bytes_out = response.body_length if response.prepared else len(_body_of(response))
        record["status"] = response.status
        self._finish(record, body, bytes_out, start, tail or _body_of(response)[-TAIL_BYTES:])
        return response

    def _finish(
        self, record: dict[str, Any], body: bytes, out: int, start: float, tail: bytes
    ) -> None:
        record["bytes_in"] = len(body)
        record["bytes_out"] = out
        record["duration_ms"] = round((time.monotonic() - start) * 1000, 1)
        record.update(token_usage(tail))
        self.audit.write(record)

    async def _forward(
        self, request: web.Request, body: bytes
    ) -> tuple[web.StreamResponse, bytes, bool]:
        """Relay one request; the flag is True when the client hung up mid-reply.

        A failed write to the client is the client's doing (it stopped
        reading after `[DONE]`, or was killed), not the model server's: it
        is audited with the upstream status and `client_gone`, never as 502.
        """
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        # The key is the gateway's business; llama-server itself has none.
        headers.pop("Authorization", None)
        headers.pop("x-api-key", None)
        url = f"http://llama{request.path_qs}"
        async with self.session().request(
            request.method, url, data=body or None, headers=headers
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            tail = b""
            async for chunk in upstream.content.iter_any():
                tail = (tail + chunk)[-TAIL_BYTES:]
                if not await _send(response, chunk):
                    return response, tail, True
            return response, tail, not await _send(response, None)


async def _send(response: web.StreamResponse, chunk: bytes | None) -> bool:
    """Write a chunk (None: the end) to the client; False if the client is gone.

    Only client-side write errors are caught here, so an upstream reset
    still surfaces as a 502.
    """
    try:
        if chunk is None:
            await response.write_eof()
        else:
            await response.write(chunk)
    except ConnectionResetError:
        return False
    return True


def _body_of(response: web.StreamResponse) -> bytes:
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        return response.body
    return b""
