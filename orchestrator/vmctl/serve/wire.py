"""What the gateway reads from and writes into the HTTP messages it relays.

Pure helpers, no I/O: who may call (the API key), hop-by-hop headers,
token counts and the model name from the bytes that pass, errors in the
clients' own shapes (OpenAI's JSON, and the last SSE event of a stream the
model server cut, OpenAI's or Anthropic's), and aiohttp's error log turned
into one escaped line; and the refusals of a caller's body (413, 408, 400).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import sys

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from vmctl import events

PUBLIC_PATHS = frozenset({"/health", "/v1/health"})
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
# One level of nesting: the Responses API's usage holds `input_tokens_details`.
_USAGE_RE = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')
_TIMINGS_RE = re.compile(rb'"timings"\s*:\s*(\{[^{}]*\})')


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


def request_model(head: bytes) -> str | None:
    """The `model` field from the first bytes of a JSON body, if it is there."""
    m = re.search(rb'"model"\s*:\s*"([^"\\]{1,200})"', head[:65536])
    return m.group(1).decode("utf-8", "replace") if m else None


def error_response(status: int, message: str, kind: str) -> web.Response:
    """Errors in OpenAI's shape, which Anthropic clients also display."""
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status)


class _OneLineHandler(logging.Handler):
    """aiohttp's errors as one escaped line on stderr, never a traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        why = f": {type(exc).__name__}: {exc}" if exc else ""
        line = events.safe(f"gateway: {record.getMessage()}{why}")[:500]
        print(line, file=sys.stderr, flush=True)


def quiet_logger() -> logging.Logger:
    log = logging.getLogger("vmctl.gateway.http")
    if not log.handlers:
        log.addHandler(_OneLineHandler())
        log.propagate = False
        log.setLevel(logging.WARNING)
    return log


def stream_error(path: str, content_type: str) -> bytes | None:
    """The last event of a stream the model server cut: OpenAI's or Anthropic's shape."""
    if content_type != "text/event-stream":
        return None
    message = "the model server stopped mid-reply; vmctl serve restarts it, retry"
    if path.startswith("/v1/messages"):
        err = {"type": "error", "error": {"type": "api_error", "message": message}}
        return f"event: error\ndata: {json.dumps(err)}\n\n".encode()
    body = {"error": {"message": message, "type": "server_error", "code": 502}}
    return f"data: {json.dumps(body)}\n\n".encode()


def authorized(request: web.BaseRequest, api_key: str | None) -> bool:
    """True when no key is set, the path is public, or a header carries the key."""
    if api_key is None or request.path in PUBLIC_PATHS:
        return True
    offered = request.headers.get("x-api-key", "")
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        offered = offered or auth[7:].strip()
    # Header bytes that are not UTF-8 arrive as surrogates: compare them as bytes.
    return hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), api_key.encode())


class BodyTooLarge(Exception):
    """A request body grew past a limit (the gateway's, or caps.MAX_CAPPED_BODY)."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.limit = limit


class Busy(Exception):
    """The gateway already holds as many capped bodies as it may (caps.MAX_HELD)."""


class BodyStalled(Exception):
    """The caller stopped sending its body (a slow-body attack or a dead client)."""


def body_refusal(
    exc: BaseException, over: int | None, body_timeout: float
) -> tuple[int, str, str] | None:
    """(status, reason, message) when the caller's body, not the model server, failed.

    `over` is the byte limit the body went past, if it did.
    """
    cause = exc if isinstance(exc, BodyStalled | HttpProcessingError) else exc.__cause__
    if isinstance(cause, BodyTooLarge):
        over = over or cause.limit
    if over is not None:
        return 413, "body_too_large", f"request body over {over} bytes"
    if isinstance(cause, BodyStalled) or isinstance(exc, BodyStalled):
        return 408, "body_timeout", f"no request body bytes for {body_timeout:.0f} s"
    if isinstance(cause, HttpProcessingError):
        return 400, "bad_request", events.safe(cause.message)[:300]
    return None
