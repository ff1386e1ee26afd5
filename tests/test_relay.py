"""The guestfwd relay, run exactly as QEMU runs it: a process speaking on stdin/stdout."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import StubFactory, StubRequest
from vmctl.sidecars.relay import request_line


def _echo(req: StubRequest) -> tuple[int, bytes]:
    return 200, b'{"echo": ' + json.dumps(req.body.decode()).encode() + b"}"


@pytest.fixture
def server(http_stub: StubFactory) -> int:
    return http_stub(_echo).port


def run_relay(port: int, audit: Path, data: bytes) -> bytes:
    argv = [sys.executable, "-m", "vmctl.sidecars.relay", "--target", f"127.0.0.1:{port}"]
    argv += ["--audit", str(audit), "--instance", "t1"]
    return subprocess.run(argv, input=data, capture_output=True, timeout=20, check=False).stdout


def test_relays_http_both_ways_and_audits_one_line(server: int, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    req = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    out = run_relay(server, audit, req)
    assert out.startswith(b"HTTP/1.0 200") and out.endswith(b'{"echo": "hello"}')
    (line,) = audit.read_text().splitlines()
    rec = json.loads(line)
    assert rec["instance"] == "t1" and rec["target"] == f"127.0.0.1:{server}"
    assert rec["request"] == "POST /v1/chat/completions HTTP/1.1"
    assert rec["bytes_out"] == len(req) and rec["bytes_in"] == len(out)
    assert rec["duration_s"] >= 0 and rec["time"] > 0 and "error" not in rec


def test_unreachable_target_is_audited_with_the_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
    audit = tmp_path / "audit.jsonl"
    assert run_relay(port, audit, b"GET / HTTP/1.1\r\n\r\n") == b""
    rec = json.loads(audit.read_text())
    assert "ConnectionRefused" in rec["error"] and rec["bytes_in"] == 0


def test_request_line_only_for_http() -> None:
    assert request_line(b"GET /v1/models HTTP/1.1\r\nHost: a\r\n") == "GET /v1/models HTTP/1.1"
    assert request_line(b"\x16\x03\x01 binary TLS hello") is None
    assert request_line(b"SSH-2.0-OpenSSH\r\n") is None
