"""The egress proxy against local servers only: HTTP, CONNECT with real TLS, refusals, bounds.

Each test drives the real proxy (the thread `vmctl run` uses, or the guest
sidecar fed by the real guestfwd connector) and reads the event log.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import HttpStub, StubFactory
from vmctl import egress, events, paths, procs
from vmctl.egress_log import aggregate, egress_events
from vmctl.sidecars import proxy_connect
from vmctl.sidecars.proxy import ProxyConfig
from vmctl.sidecars.proxy_serve import ProxyThread


def ok(_req: object) -> tuple[int, bytes]:
    return 200, b"hello from the test server\n"


@pytest.fixture
def stub(http_stub: StubFactory) -> HttpStub:
    return http_stub(ok)


def start(tmp_path: Path, preset: str, **kw: object) -> ProxyThread:
    resolve = {"pkg.test": ["127.0.0.1"], "other.test": ["127.0.0.1"], "bad.x.test": ["127.0.0.1"]}
    cfg = ProxyConfig("client", "t", preset, resolve, paths.events_dir(), **kw)  # type: ignore[arg-type]
    return ProxyThread(cfg, tmp_path / "px.sock").start()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ProxyThread]:
    px = start(tmp_path, "balanced")
    yield px
    px.close()


def ask(px: ProxyThread, head: str, timeout: float = 10.0) -> bytes:
    """One request through the proxy's socket; everything it answers."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(px.socket_path))
        s.sendall(head.encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def get(px: ProxyThread, host: str, port: int) -> bytes:
    return ask(px, f"GET http://{host}:{port}/x HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n")


def allow(*targets: str) -> None:
    for t in targets:
        egress.add_rule(egress.parse_rule("allow", t))


def logged() -> list[events.Event]:
    return egress_events("t")


def test_http_to_an_allowed_name_is_forwarded_and_logged(
    proxy: ProxyThread, stub: HttpStub
) -> None:
    allow("pkg.test", f"127.0.0.1:{stub.port}")
    out = get(proxy, "pkg.test", stub.port)
    assert out.startswith(b"HTTP/1.0 200") and out.endswith(b"hello from the test server\n")
    assert stub.requests[-1].path == "/x"  # origin-form on the way out
    assert "Proxy-Connection" not in stub.requests[-1].headers
    (e,) = logged()
    assert (e.kind, e.who_kind, e.host, e.port, e.address, e.decision) == (
        "egress", "client", "pkg.test", stub.port, "127.0.0.1", "allow",
    )  # fmt: skip
    assert e.method == "GET" and e.bytes_down == len(out) and e.bytes_up > 0
    assert e.rule == f"allow 127.0.0.1/32:{stub.port} (global)" and e.duration_ms is not None


def test_a_denied_name_gets_403_naming_the_rule(proxy: ProxyThread, stub: HttpStub) -> None:
    allow(f"127.0.0.1:{stub.port}")
    out = get(proxy, "other.test", stub.port)
    assert out.startswith(b"HTTP/1.1 403 Forbidden")
    assert b"no rule allows other.test" in out and b"preset balanced" in out
    egress.add_rule(egress.parse_rule("allow", "*.x.test"))
    egress.add_rule(egress.parse_rule("deny", "bad.x.test"))
    out = get(proxy, "bad.x.test", stub.port)  # deny beats allow
    assert b"(rule: deny bad.x.test (global))" in out
    assert not stub.requests
    assert [(e.decision, e.status) for e in logged()] == [("deny", 403), ("deny", 403)]


def test_loopback_is_refused_under_open_unless_a_cidr_rule_names_it(
    tmp_path: Path, stub: HttpStub
) -> None:
    px = start(tmp_path, "open")
    try:
        by_literal = get(px, "127.0.0.1", stub.port)
        by_name = get(px, "localhost", stub.port)  # resolves to 127.0.0.1 (or ::1)
        rebound = get(px, "pkg.test", stub.port)
        assert b"never: IP literal" not in by_literal  # loopback is named for what it is
        for out in (by_literal, by_name, rebound):
            assert out.startswith(b"HTTP/1.1 403") and b"never: loopback address" in out, out
        allow(f"127.0.0.1:{stub.port}")  # added while running: the next connection sees it
        assert get(px, "127.0.0.1", stub.port).startswith(b"HTTP/1.0 200")
        assert get(px, "pkg.test", stub.port).startswith(b"HTTP/1.0 200")
        assert len(stub.requests) == 2
    finally:
        px.close()


def test_ip_literal_of_a_public_address_needs_a_cidr_rule(tmp_path: Path) -> None:
    px = start(tmp_path, "open")
    try:
        out = ask(px, "CONNECT 1.1.1.1:443 HTTP/1.1\r\n\r\n")
        assert b"never: IP literal 1.1.1.1 (needs a CIDR rule)" in out
    finally:
        px.close()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[int]:
    """A small local TLS server with a throwaway self-signed certificate."""
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=tls.test", "-addext", "subjectAltName=DNS:tls.test",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(4096)
                    tls.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
            except (OSError, ssl.SSLError):
                continue

    threading.Thread(target=loop, daemon=True).start()
    (tmp_path / "ca.pem").write_bytes(cert.read_bytes())
    yield int(srv.getsockname()[1])
    stop.set()
    srv.close()


def test_connect_passes_tls_through_untouched(
    tmp_path: Path, proxy: ProxyThread, tls_server: int
) -> None:
    allow("tls.test", f"127.0.0.1:{tls_server}")
    proxy.proxy.config.resolve["tls.test"] = ["127.0.0.1"]
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(10)
        raw.connect(str(proxy.socket_path))
        raw.sendall(f"CONNECT tls.test:{tls_server} HTTP/1.1\r\nHost: tls.test\r\n\r\n".encode())
        assert raw.recv(4096) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with ctx.wrap_socket(raw, server_hostname="tls.test") as tls:  # the origin's own cert
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert tls.recv(4096).endswith(b"secret")
    time.sleep(0.5)
    (e,) = logged()
    assert (e.action, e.method, e.decision, e.status) == ("connect", "CONNECT", "allow", 200)
    assert e.bytes_up > 200 and e.bytes_down > 500  # a TLS handshake each way


def test_bounds_cap_idle_and_head_size(tmp_path: Path, tls_server: int) -> None:
    allow("pkg.test", f"127.0.0.1:{tls_server}")
    px = start(tmp_path, "balanced", max_connections=2, idle_timeout=2.0)
    try:
        held = []
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(px.socket_path))
            s.sendall(f"CONNECT pkg.test:{tls_server} HTTP/1.1\r\n\r\n".encode())
            assert s.recv(100).startswith(b"HTTP/1.1 200")
            held.append(s)
        assert ask(px, "CONNECT pkg.test:1 HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 503")
        t0 = time.monotonic()
        for s in held:  # idle: the proxy closes them
            s.settimeout(10)
            assert s.recv(100) == b""
            s.close()
        assert time.monotonic() - t0 < 8
        big = "GET http://pkg.test/ HTTP/1.1\r\nX: " + "a" * 20000 + "\r\n\r\n"
        assert ask(px, big).startswith(b"HTTP/1.1 431")
        assert ask(px, "GET /local HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
    finally:
        px.close()


def test_guest_sidecar_takes_the_connectors_socket(tmp_path: Path, stub: HttpStub) -> None:
    """The real sidecar process and connector, as QEMU's guestfwd starts them."""
    allow("pkg.test", f"127.0.0.1:{stub.port}")
    sock = tmp_path / "proxy.sock"
    argv = [sys.executable, "-m", "vmctl.sidecars.proxy_serve", "--socket", str(sock),
            "--who-kind", "guest", "--who", "g1", "--preset", "balanced",
            "--resolve", "pkg.test:127.0.0.1", "--events", str(paths.events_dir()),
            "--instance-meta", str(tmp_path / "instance.json")]  # fmt: skip
    qemu = subprocess.Popen(["sleep", "60"])  # stands in for the guest's QEMU
    meta = {"qemu": {"pid": qemu.pid, "start": procs.start_time(qemu.pid)}}
    (tmp_path / "instance.json").write_text(json.dumps(meta))
    side = subprocess.Popen(argv)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.1)
        guest, slirp = socket.socketpair()  # what libslirp hands the connector
        conn = subprocess.run(
            [sys.executable, "-I", "-S", proxy_connect.__file__, str(sock)],
            stdin=slirp, stdout=slirp, timeout=30, check=False,
        )  # fmt: skip
        slirp.close()
        assert conn.returncode == 0
        guest.sendall(f"GET http://pkg.test:{stub.port}/g HTTP/1.1\r\n\r\n".encode())
        guest.settimeout(10)
        out = b""
        while chunk := guest.recv(4096):
            out += chunk
        assert out.startswith(b"HTTP/1.0 200"), out
        assert side.poll() is None
        qemu.kill()  # the guest is gone (a killed vmctl, a poweroff): the sidecar follows
        qemu.wait()
        assert side.wait(timeout=10) == 0
        assert not sock.exists()
    finally:
        for p in (side, qemu):
            p.kill()
            p.wait()
    rows = aggregate(egress_events("g1"))
    assert [(r.who, r.host, r.decision, r.count) for r in rows] == [
        ("guest-g1", "pkg.test", "allow", 1)
    ]
