"""A fake Hugging Face hub on 127.0.0.1 speaking huggingface_hub's file API.

It serves model info with LFS sha256s, HEAD with X-Repo-Commit /
X-Linked-Etag / X-Linked-Size, and GET with Range (slowly when asked, so a
`vmctl pull` can be killed mid-file), so the real download paths run:
vmctl's resumable one for LFS files, huggingface_hub's for the rest and
for offline lookups. Point HF_ENDPOINT at `FakeHub.url`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^(?P<cdn>/cdn)?/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


@dataclass
class Sent:
    """Body bytes handed to the socket for one GET, counted before each write
    so a client that has read everything never sees an older count."""

    name: str
    range: str
    n: int = 0


@dataclass
class FakeHub:
    url: str = ""
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)  # cut the connection mid-file once
    corrupt: set[str] = field(default_factory=set)  # serve bytes that do not match the sha
    ignore_range: set[str] = field(default_factory=set)  # answer 200 and the whole file
    slow: dict[str, float] = field(default_factory=dict)  # seconds per 4 KB sent
    sent: list[Sent] = field(default_factory=list)  # one per file GET
    cdn: set[str] = field(default_factory=set)  # redirect to another origin, as the hub does
    cdn_auth: list[str] = field(default_factory=list)  # Authorization headers the CDN saw
    log: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, Range
    auth: set[str] = field(default_factory=set)  # Authorization headers seen

    def add(self, repo: str, name: str, data: bytes) -> bytes:
        self.repos.setdefault(repo, {})[name] = data
        return data

    def gets(self, name: str) -> list[str]:
        return [rng for m, p, rng in self.log if m == "GET" and p.endswith("/" + name)]


class Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, code: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _missing(self, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        self._send(404, {"X-Error-Code": code, "Content-Length": str(len(body))}, body)

    def _info(self, repo: str) -> None:
        files = self.hub.repos.get(repo)
        if files is None:
            return self._missing("RepoNotFound")
        siblings = [
            {
                "rfilename": n,
                "size": len(d),
                "lfs": {"size": len(d), "sha256": sha256_hex(d), "pointerSize": 134},
            }
            for n, d in files.items()
        ]
        body = json.dumps({"id": repo, "sha": COMMIT, "siblings": siblings}).encode()
        self._send(
            200, {"Content-Type": "application/json", "Content-Length": str(len(body))}, body
        )

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/api/agent-harnesses":  # huggingface_hub's own telemetry, not the file API
            return self._missing("NotFound")
        self.hub.log.append((self.command, path, self.headers.get("Range", "")))
        auth = self.headers.get("Authorization", "")
        (self.hub.cdn_auth.append if path.startswith("/cdn/") else self.hub.auth.add)(auth)
        if path.startswith("/api/models/"):
            return self._info(path.removeprefix("/api/models/"))
        m = RESOLVE.match(path)
        files = self.hub.repos.get(m["repo"]) if m else None
        if m is None or files is None:
            return self._missing("RepoNotFound")
        name = m["file"]
        if name not in files:
            return self._missing("EntryNotFound")
        data = files[name]
        meta = {
            "X-Repo-Commit": COMMIT,
            "X-Linked-Etag": f'"{sha256_hex(data)}"',
            "ETag": f'"{sha256_hex(data)}"',
            "X-Linked-Size": str(len(data)),
            "Accept-Ranges": "bytes",
        }
        if name in self.hub.cdn and not m["cdn"]:
            port = self.server.server_address[1]
            where = {"Location": f"http://localhost:{port}/cdn{path}", "Content-Length": "0"}
            return self._send(302, {**meta, **where})
        if name in self.hub.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        start = 0
        rng = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        if rng and self.command == "GET" and name not in self.hub.ignore_range:
            start = int(rng[1])
            meta["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        meta["Content-Length"] = str(len(body))
        if self.command == "GET" and name in self.hub.drop_once:
            self.hub.drop_once.discard(name)
            self.send_response(200)
            for k, v in meta.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(0.3)  # let the client take in the first half before the cut
            self.close_connection = True
            return
        self._stream(206 if start else 200, meta, body, name)

    def _stream(self, code: int, headers: dict[str, str], body: bytes, name: str) -> None:
        """Send a file's bytes, 4 KB at a time when slow; record how many got out."""
        if self.command == "HEAD":
            return self._send(code, headers)
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        sent = Sent(name, self.headers.get("Range", ""))
        self.hub.sent.append(sent)
        delay = self.hub.slow.get(name, 0.0)
        step = 4096 if delay else max(len(body), 1)
        try:
            for i in range(0, len(body), step):
                sent.n += len(body[i : i + step])
                self.wfile.write(body[i : i + step])
                self.wfile.flush()
                time.sleep(delay)
        except OSError:  # the client went away (killed)
            self.close_connection = True


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def serve_hub() -> Iterator[FakeHub]:
    """A FakeHub served from a thread for the duration of the block."""
    state = FakeHub()
    handler = type("H", (Handler,), {"hub": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
