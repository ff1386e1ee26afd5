"""Local peers for the egress tests: a plain HTTP server and a small TLS server.

Both listen on 127.0.0.1 only; tests reach them through `--resolve NAME:127.0.0.1`
plus a CIDR rule naming the port, never through any other address.
"""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
from pathlib import Path

BODY = b"hello from the test server\n"


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


class HelloServer:
    def __init__(self) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TlsServer:
    """Answers one HTTP request per TLS connection with `secret`; CN and SAN tls.test.

    The cipher list is wide on purpose: busybox's TLS client in the guest
    offers only a few suites.
    """

    def __init__(self, folder: Path) -> None:
        self.cert, key = folder / "tls-cert.pem", folder / "tls-key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=tls.test", "-addext", "subjectAltName=DNS:tls.test",
             "-keyout", str(key), "-out", str(self.cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(self.cert, key)
        self.ctx.set_ciphers("ALL:@SECLEVEL=0")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(20)
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(4096)
                    tls.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
            except (OSError, ssl.SSLError):
                continue

    def close(self) -> None:
        self.sock.close()
