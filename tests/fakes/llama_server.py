"""A stand-in llama-server: `--host SOCK` on a UNIX socket, `/health` and `/v1/models`.

For the supervisor's lifecycle (health wait, records, stop) where a real
llama-server is not the point. `FAKE_LLAMA_LOAD_S` delays readiness (503
until then); `FAKE_LLAMA_DIE=1` exits while "loading", as a bad model would.
"""

from __future__ import annotations

import json
import os
import socketserver
import sys
import time
from http.server import BaseHTTPRequestHandler

READY_AT = time.monotonic() + float(os.environ.get("FAKE_LLAMA_LOAD_S", "0.5"))


class Handler(BaseHTTPRequestHandler):
    alias = "fake"

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: object) -> None:
        print(format % args, file=sys.stderr, flush=True)

    def _json(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            ready = time.monotonic() >= READY_AT
            self._json(200 if ready else 503, {"status": "ok" if ready else "loading model"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.alias, "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})


def main(argv: list[str]) -> int:
    sock = argv[argv.index("--host") + 1]
    Handler.alias = argv[argv.index("--alias") + 1] if "--alias" in argv else "fake"
    print(f"fake llama-server: {' '.join(argv)}", file=sys.stderr, flush=True)
    if os.environ.get("FAKE_LLAMA_DIE"):
        print("fake llama-server: cannot load the model", file=sys.stderr, flush=True)
        return 1
    with socketserver.ThreadingUnixStreamServer(sock, Handler) as server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
