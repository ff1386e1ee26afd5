"""A ceiling on reply length: `vmctl serve --max-output TOKENS`.

llama-server lets each request's own limit (`max_tokens`, ...) override its
`--n-predict`, and clients send none (Codex) or one sized to the whole
context (Claude Code): one request from a guest can keep the model busy for
minutes. With a ceiling set, the gateway lowers the request's limit to it,
or adds it in the field that API reads when the request has none.

Only the generating routes' bodies are read whole for this, and only up to
MAX_CAPPED_BODY (far more text than any context holds); every other body
still streams through untouched.
"""

from __future__ import annotations

import json
from typing import Any

#: The largest generating request read whole to be capped (413 above it).
MAX_CAPPED_BODY = 8 * 1024 * 1024
#: All such bodies held at once, whoever sent them (503 above it): without it,
#: 64 requests in flight could make the gateway hold 512 MiB.
MAX_HELD = 64 * 1024 * 1024


class Held:
    """The bytes of request bodies the gateway holds right now, against MAX_HELD."""

    def __init__(self) -> None:
        self.bytes = 0

    def take(self, n: int) -> bool:
        """Count `n` more bytes; False once over the limit (they stay counted)."""
        self.bytes += n
        return self.bytes <= MAX_HELD

    def give(self, n: int) -> None:
        self.bytes -= n


#: Every field llama-server reads a reply limit from, in any API.
LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict")


def route_field(path: str) -> str | None:
    """The limit field of the generating route `path`, None for any other route.

    Anthropic's Messages API reads only `max_tokens` (llama-server drops
    `n_predict` there), the Responses API `max_output_tokens`, llama.cpp's
    own routes `n_predict`.
    """
    route = path.split("?", 1)[0].rstrip("/")
    if route.endswith("/messages"):
        return "max_tokens"
    if route.endswith("/responses"):
        return "max_output_tokens"
    if route.endswith("/chat/completions") or route in ("/v1/completions", "/completions"):
        return "max_tokens"
    if route in ("/completion", "/infill"):
        return "n_predict"
    return None


def _within(value: Any, ceiling: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= ceiling


def cap(body: bytes, field: str, ceiling: int) -> bytes | None:
    """`body` with every reply limit at most `ceiling` (`field` added if none).

    None when the body is not a JSON object: it goes on as it came, and
    llama-server answers it with its own error.
    """
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    changed = False
    for key in LIMIT_FIELDS:
        # -1 (llama's "until the context is full"), 0, floats, strings: all the ceiling.
        if key in data and not _within(data[key], ceiling):
            data[key] = ceiling
            changed = True
    if field not in data:
        data[field] = ceiling
        changed = True
    return json.dumps(data).encode() if changed else body
