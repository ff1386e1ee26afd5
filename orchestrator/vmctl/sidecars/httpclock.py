"""Where a guest's HTTP request stream is: enough framing to time each request.

The sidecar copies bytes; it does not answer HTTP. But a slowloris guest
trickles a request head or body to hold a connection (and the gateway's
slot) forever, so the sidecar follows the framing of what the guest sends:
each request's head up to its blank line, then its body by Content-Length
or to the last chunk. `started` is when the unfinished request's first byte
came (None between requests); the sidecar refuses to wait past its limit.
Pipelined requests in one read are each counted. The parse is lenient: a
stream it cannot frame is left to the gateway, which answers it 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable

HEAD_KEEP = 16384
_LINE_RE = re.compile(rb"^([A-Za-z]{1,16}) (\S{1,4096}) HTTP/\d(?:\.\d)?$")
_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,18})[ \t]*(?=\r\n)", re.I)
_CHUNKED_RE = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.I)
_LAST_CHUNK = b"\r\n0\r\n\r\n"


class RequestClock:
    """Feed it the guest's bytes; it tracks request boundaries and their start."""

    def __init__(self, on_request: Callable[[str, str], None] | None = None):
        self.on_request = on_request
        self.started: float | None = None
        self.requests = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._head = b""
        self._body_left = 0
        self._chunked = False
        self._tail = b""

    def feed(self, data: bytes, now: float) -> None:
        self.bytes_up += len(data)
        while data:
            if self._body_left:
                used = min(self._body_left, len(data))
                self._body_left -= used
                data = data[used:]
                if not self._body_left:
                    self.started = None
            elif self._chunked:
                seen = self._tail + data
                end = seen.find(_LAST_CHUNK)
                if end < 0:
                    self._tail = seen[-(len(_LAST_CHUNK) - 1) :]
                    return
                data = seen[end + len(_LAST_CHUNK) :]
                self._chunked, self._tail, self.started = False, b"", None
            else:
                if not self._head:
                    data = data.lstrip(b"\r\n")
                    if not data:
                        return
                if self.started is None:
                    self.started = now
                data = self._feed_head(data)

    def _feed_head(self, data: bytes) -> bytes:
        """Add to the head; at its end, start the body; returns what follows the head."""
        before = len(self._head)
        self._head += data
        end = self._head.find(b"\r\n\r\n", max(0, before - 3))
        if end < 0:
            if len(self._head) > HEAD_KEEP:  # the gateway will refuse it; keep the start
                self._head = self._head[: HEAD_KEEP // 2] + self._head[-3:]
            return b""
        head, rest = self._head[: end + 2], self._head[end + 4 :]
        self._head = b""
        self.requests += 1
        line = head.split(b"\r\n", 1)[0]
        m = _LINE_RE.match(line)
        if self.on_request is not None:
            method, path = (m.group(1), m.group(2)) if m else (b"?", line[:200])
            self.on_request(method.decode("latin-1"), path.decode("latin-1"))
        length = _LENGTH_RE.search(head)
        if _CHUNKED_RE.search(head):
            self._chunked, self._tail = True, b"\r\n"
        elif length and int(length.group(1)):
            self._body_left = int(length.group(1))
        else:
            self.started = None
        return rest
