"""The audited HTTP gateway in front of a sandboxed llama-server.

llama-server listens on a UNIX socket inside its sandbox and has no
network at all; this gateway is the only way in. It listens on host:port
for host callers and on a private UNIX socket for vmctl's own sidecars
(vmctl.routes: the caller's name comes from the sidecar, never from a
header), enforces the API key (`Authorization: Bearer` or `x-api-key`,
`/health` public), streams request bodies to llama-server and responses
back chunk by chunk, and bounds what a caller can make it hold: a body
size limit (413) and a limit on requests in flight (503).

Every request it answers has exactly one `vmctl.events.Event` in its
caller's file, refusals and parser errors included: the handler writes
the ones it answers, the access logger (which aiohttp calls for every
response) writes the rest. aiohttp's own error logging goes through a
one-line logger, so no input leaves a traceback in server.log.
"""

from __future__ import annotations

import asyncio
import sys
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from vmctl import events
from vmctl.events import Event, EventLog
from vmctl.serve import caps
from vmctl.serve.wire import (
    HOP_BY_HOP,
    BodyStalled,
    BodyTooLarge,
    Busy,
    authorized,
    body_refusal,
    error_response,
    quiet_logger,
    request_model,
    stream_error,
    token_usage,
)

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_IN_FLIGHT = 64
BODY_TIMEOUT_S = 30.0
TAIL_BYTES = 64 * 1024
HOST_CALLER = ("host", "local")
# Marks a request whose event is written (aiohttp >= 3.12 wants typed keys).
_AUDITED: Any = web.RequestKey("vmctl_audited", bool) if hasattr(web, "RequestKey") else "audited"


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens, what it forwards to, who may call it, its bounds."""

    host: str
    port: int
    socket: Path
    events: Path  # the events folder (paths.events_dir())
    api_key: str | None = None
    alias: str | None = None
    name: str = "gateway"  # the server's name, recorded in every event
    routes: Path | None = None  # the sidecars' UNIX socket (vmctl.routes)
    max_body: int = MAX_BODY_BYTES
    max_in_flight: int = MAX_IN_FLIGHT
    body_timeout: float = BODY_TIMEOUT_S  # longest wait for the next body bytes
    max_output: int | None = None  # reply-length ceiling in tokens (vmctl.serve.caps)


class Gateway:
    """An aiohttp app that forwards to llama-server's UNIX socket, auditing each request."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self._logs: dict[tuple[str, str], EventLog] = {}
        self._callers: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._routes: Any = None
        self.in_flight = 0
        self.held = caps.Held()

    async def start(self) -> None:
        """Bind host:port (and the routes socket); raises OSError when taken."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        gateway = self

        class Access(AbstractAccessLogger):
            def log(self, request: web.BaseRequest, response: web.StreamResponse, _: float) -> None:
                gateway.unanswered(request, response)

            @property
            def enabled(self) -> bool:
                return True

        # A caller hanging up cancels its handler and so the upstream request:
        # llama-server stops generating for nobody (audited `client_gone`).
        self._runner = web.AppRunner(
            app, access_log_class=Access, handle_signals=False, logger=quiet_logger(),
            handler_cancellation=True,
        )  # fmt: skip
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        try:
            await site.start()
            if self.config.routes is not None:
                from vmctl.routes import listen

                self._routes = await listen(self.config.routes, self.attach)
        except OSError:
            await self.close()
            raise

    def attach(self, transport: asyncio.BaseTransport, who: tuple[str, str]) -> asyncio.Protocol:
        """Hand a sidecar's connection, its caller known, to aiohttp's HTTP handler."""
        assert self._runner is not None and self._runner.server is not None
        self._callers[transport] = who
        handler: asyncio.Protocol = self._runner.server()
        return handler

    async def close(self) -> None:
        if self._routes is not None:
            self._routes.close()
            self._routes = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        for log in self._logs.values():
            log.close()
        self._logs.clear()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.UnixConnector(path=str(self.config.socket), limit=0)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False
            )
        return self._session

    # ---- auditing ----
    def caller(self, request: web.BaseRequest) -> tuple[str, str]:
        """Who made the request: the sidecar's route, else an unnamed host caller."""
        transport = request.transport
        return self._callers.get(transport, HOST_CALLER) if transport else HOST_CALLER

    def record(self, request: web.BaseRequest, **fields: Any) -> None:
        """Write the one event of `request` (the first call wins)."""
        if request.get(_AUDITED):
            return
        request[_AUDITED] = True
        who_kind, who = self.caller(request)
        log = self._logs.get((who_kind, who))
        if log is None:
            log = EventLog(events.subject_file(self.config.events, who_kind, who))
            self._logs[(who_kind, who)] = log
        method = events.safe(request.method)[:32]
        path = events.safe(request.raw_path)[:2048]
        if (who_kind, who) == HOST_CALLER and request.remote and "address" not in fields:
            fields["address"] = events.safe(request.remote)[:64]  # the peer: one of many hosts
        event = Event(
            "request", who_kind, who, "gateway", f"{method} {path}", method=method, path=path,
            server=self.config.name, **fields,
        )  # fmt: skip
        try:
            log.write(event)
        except OSError as e:
            print(f"gateway: cannot write the audit: {e}", file=sys.stderr, flush=True)

    def unanswered(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """The access logger's hook: audit what the handler never saw (parser errors)."""
        text = response.text if isinstance(response, web.Response) else None
        reason = "bad_request" if response.status < 500 else "internal_error"
        self.record(
            request, status=response.status, decision="deny", reason=reason,
            detail=events.safe(text or "")[:300] or None, bytes_up=0,
            bytes_down=response.body_length,
        )  # fmt: skip

    # ---- the handler ----
    async def handle(self, request: web.Request) -> web.StreamResponse:
        start = time.monotonic()
        fields: dict[str, Any] = {}
        counted = {"up": 0}
        response: web.StreamResponse | None = None
        try:
            response = await self._answer(request, fields, counted)
        except asyncio.CancelledError:  # the caller hung up (handler_cancellation)
            fields.setdefault("reason", "client_gone")
            sent = fields.pop("sent", None)  # headers already out: their status stands
            self._done(request, sent, fields, counted, start, status=None if sent else 499)
            raise
        except Exception as e:  # a bug must still answer and be audited, not traceback
            fields.update(decision="deny", reason="internal_error", detail=f"{type(e).__name__}")
            response = error_response(500, "internal gateway error", "server_error")
        fields.pop("sent", None)
        self._done(request, response, fields, counted, start)
        return response

    def _done(
        self,
        request: web.Request,
        response: web.StreamResponse | None,
        fields: dict[str, Any],
        counted: dict[str, int],
        start: float,
        status: int | None = None,
    ) -> None:
        down = 0
        if response is not None:
            down = response.body_length if response.prepared else len(_body_of(response))
            status = status or response.status
        tokens = token_usage(bytes(fields.pop("tail", b""))[-TAIL_BYTES:])
        self.record(
            request,
            status=status,
            bytes_up=counted["up"],
            bytes_down=down,
            duration_ms=round((time.monotonic() - start) * 1000, 1),
            tokens_in=tokens.get("prompt_tokens"),
            tokens_out=tokens.get("completion_tokens"),
            **{"decision": "allow", **fields},
        )

    async def _answer(
        self, request: web.Request, fields: dict[str, Any], counted: dict[str, int]
    ) -> web.StreamResponse:
        cfg = self.config
        # A route is authenticated by who opened it (vmctl's own sidecar): no key is
        # needed, so guests are given none.
        routed = self.caller(request) != HOST_CALLER
        if not routed and not authorized(request, cfg.api_key):
            fields.update(decision="deny", reason="unauthorized")
            return error_response(401, "invalid or missing API key", "authentication_error")
        length = request.content_length
        if length is not None and length > cfg.max_body:
            fields.update(decision="deny", reason="body_too_large")
            response = error_response(
                413, f"request body over {cfg.max_body} bytes", "invalid_request_error"
            )
            response.force_close()
            return response
        if self.in_flight >= cfg.max_in_flight:
            return _busy(fields, f"{cfg.max_in_flight} requests in flight; retry later")
        self.in_flight += 1
        try:
            return await self._forward(request, fields, counted)
        except Busy:
            return _busy(fields, "too many request bodies held at once; retry later")
        except (BodyTooLarge, BodyStalled, HttpProcessingError, aiohttp.ClientError, OSError) as e:
            over = e.limit if isinstance(e, BodyTooLarge) else None
            over = cfg.max_body if counted["up"] > cfg.max_body else over
            refused = body_refusal(e, over, cfg.body_timeout)
            if refused is not None:
                fields.update(decision="deny", reason=refused[1], detail=refused[2])
                response = error_response(refused[0], refused[2], "invalid_request_error")
                response.force_close()
                return response
            fields.update(reason="upstream_error", detail=events.safe(str(e) or repr(e))[:300])
            return error_response(502, "model server unavailable", "server_error")
        finally:
            self.in_flight -= 1

    async def _body(
        self, request: web.Request, fields: dict[str, Any], counted: dict[str, int]
    ) -> AsyncIterator[bytes]:
        """The request body as it arrives, counted and capped; notes its model."""
        while True:
            try:
                chunk = await asyncio.wait_for(request.content.readany(), self.config.body_timeout)
            except TimeoutError:
                raise BodyStalled from None
            if not chunk:
                return
            if counted["up"] < 65536:
                fields["model"] = fields.get("model") or request_model(chunk)
            counted["up"] += len(chunk)
            if counted["up"] > self.config.max_body:
                raise BodyTooLarge(self.config.max_body)
            yield chunk

    async def _forward(
        self, request: web.Request, fields: dict[str, Any], counted: dict[str, int]
    ) -> web.StreamResponse:
        """Relay one request; a client hanging up mid-reply is `client_gone`, never 502."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        # The key is the gateway's business; llama-server itself has none.
        headers.pop("Authorization", None)
        headers.pop("x-api-key", None)
        data: AsyncIterator[bytes] | bytes | None = None
        if request.body_exists:
            data = self._body(request, fields, counted)
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
            field = caps.route_field(request.path) if self.config.max_output else None
            if field is not None and request.method == "POST":
                data = await self._capped(data, field)
                headers["Content-Length"] = str(len(data))
        url = f"http://llama{request.raw_path}"
        async with self.session().request(
            request.method, url, data=data, headers=headers
        ) as upstream:
            if counted["up"] > self.config.max_body:
                raise BodyTooLarge(self.config.max_body)
            fields["model"] = fields.get("model") or self.config.alias
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            fields["sent"] = response
            tail = fields["tail"] = bytearray()  # the last bytes: where the usage is
            try:
                async for chunk in upstream.content.iter_any():
                    tail += chunk
                    if len(tail) > 2 * TAIL_BYTES:  # trimmed now and then, not per chunk
                        del tail[:-TAIL_BYTES]
                    if not await _send(response, chunk):
                        fields["reason"] = "client_gone"
                        return response
            except (aiohttp.ClientError, OSError) as e:
                # Headers are sent: the client learns of the cut in its own protocol.
                fields.update(reason="upstream_error", detail=events.safe(str(e) or repr(e))[:300])
                response.force_close()
                last = stream_error(request.path, response.content_type)
                if last is not None:
                    await _send(response, last)
            if not await _send(response, None):
                fields["reason"] = "client_gone"
            return response

    async def _capped(self, body: AsyncIterator[bytes], field: str) -> bytes:
        """The whole body, its reply limit lowered to the server's ceiling."""
        whole = bytearray()
        try:
            async for chunk in body:
                whole += chunk  # counted at once, so `give` returns exactly what was taken
                if not self.held.take(len(chunk)):
                    raise Busy
                if len(whole) > caps.MAX_CAPPED_BODY:
                    raise BodyTooLarge(caps.MAX_CAPPED_BODY)
        finally:
            self.held.give(len(whole))
        assert self.config.max_output is not None
        return caps.cap(bytes(whole), field, self.config.max_output) or bytes(whole)


def _busy(fields: dict[str, Any], message: str) -> web.Response:
    """503 with Retry-After: a bound of the gateway's was reached, not the caller's fault."""
    fields.update(decision="deny", reason="busy")
    response = error_response(503, message, "server_error")
    response.headers["Retry-After"] = "1"
    return response


async def _send(response: web.StreamResponse, chunk: bytes | None) -> bool:
    """Write a chunk (None: the end) to the client; False if the client is gone."""
    try:
        if chunk is None:
            await response.write_eof()
        else:
            await response.write(chunk)
    except ConnectionError:
        return False
    return True


def _body_of(response: web.StreamResponse) -> bytes:
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        return response.body
    return b""
