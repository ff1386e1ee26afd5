"""A llama-server that dies under load: restarted with backoff, audited, streams told.

`vmctl serve --no-sandbox` runs a stand-in llama-server (tests/standin_llama.py)
that streams slowly; the test SIGKILLs it mid-stream, as the OOM killer would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port
from vmctl import events

VMCTL = [sys.executable, "-m", "vmctl"]


def standin(home: Path, delay: float) -> Path:
    script = Path(__file__).with_name("standin_llama.py")
    path = home / "llama-standin"
    path.write_text(f'#!/bin/sh\nSTANDIN_DELAY={delay} exec {sys.executable} {script} "$@"\n')
    path.chmod(0o755)
    return path


def serve(home: Path, *extra: str) -> tuple[dict[str, str], int]:
    env = {**os.environ, "VMCTL_HOME": str(home), "VMCTL_QUIET": "1"}
    port = free_port()
    r = subprocess.run(
        [*VMCTL, "serve", "--detach", "--no-sandbox", "--llama-server", str(standin(home, 0.1)),
         "--port", str(port), "--name", "s1", *extra],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return env, port


def llama_pid(home: Path) -> int:
    return int(json.loads((home / "servers/s1/server.json").read_text())["llama"]["pid"])


def stream(port: int, path: str, body: dict[str, object], out: list[bytes]) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            while chunk := r.read1(65536):
                out.append(chunk)
    except OSError as e:
        out.append(f"!{e}".encode())


def lifecycle(home: Path) -> list[str]:
    found = events.read_file(events.subject_file(home / "events", "server", "s1"))
    return [e.action for e in found if e.kind == "lifecycle"]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


def test_killed_llama_server_is_restarted_and_streams_end_with_an_error(home: Path) -> None:
    env, port = serve(home)
    try:
        outs: list[list[bytes]] = [[], []]
        body = {"model": "m", "stream": True, "max_tokens": 100}
        threads = [
            threading.Thread(target=stream, args=(port, "/v1/chat/completions", body, outs[0])),
            threading.Thread(target=stream, args=(port, "/v1/messages", body, outs[1])),
        ]
        for t in threads:
            t.start()
        time.sleep(1.5)
        old = llama_pid(home)
        os.kill(old, signal.SIGKILL)
        killed = time.monotonic()
        for t in threads:
            t.join(30)
        openai, anthropic = (b"".join(o) for o in outs)
        assert b'data: {"choices"' in openai and b'data: {"error"' in openai
        assert b"[DONE]" not in openai
        assert b"event: error\ndata: " in anthropic and b'"api_error"' in anthropic
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and lifecycle(home).count("ready") < 2:
            time.sleep(0.2)
        assert time.monotonic() - killed < 10  # restarted within the first backoff step
        assert lifecycle(home) == ["serve", "ready", "crash", "restart", "ready"]
        assert llama_pid(home) != old
        out: list[bytes] = []
        stream(port, "/v1/chat/completions", {"stream": True, "max_tokens": 2}, out)
        assert b"[DONE]" in b"".join(out)
        subprocess.run([*VMCTL, "stop", "s1"], env=env, timeout=60, check=True)
        assert lifecycle(home)[-1] == "stop"
        cut = [
            e
            for e in events.read_all((home / "events").glob("*.jsonl"))
            if e.reason == "upstream_error"
        ]
        assert len(cut) == 2  # both cut streams audited as such
    finally:
        subprocess.run([*VMCTL, "stop", "s1"], env=env, timeout=60, check=False)


def test_restart_no_lets_the_server_stop(home: Path) -> None:
    env, _ = serve(home, "--restart", "no")
    try:
        os.kill(llama_pid(home), signal.SIGKILL)
        meta = home / "servers/s1/server.json"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and json.loads(meta.read_text())["state"] != "stopped":
            time.sleep(0.2)
        assert json.loads(meta.read_text())["state"] == "stopped"
        assert lifecycle(home) == ["serve", "ready", "crash", "stop"]
        (stopped,) = [e for e in events.read_all((home / "events").glob("*.jsonl"))
                      if e.action == "stop"]  # fmt: skip
        assert stopped.reason == "failed" and "llama-server died" in str(stopped.detail)
    finally:
        subprocess.run([*VMCTL, "stop", "s1"], env=env, timeout=60, check=False)


def test_hostile_requests_to_a_real_server_each_audited_no_traceback_anywhere(home: Path) -> None:
    """The odd and hostile list against `vmctl serve` itself: lines equal requests."""
    import asyncio

    from test_gateway_hostile import HOSTILE, raw

    env, port = serve(home, "--api-key", "sekrit")
    try:
        sent = 0
        for what, data, n in HOSTILE:
            reply = asyncio.run(raw(port, data, wait=35 if what == "stalled body" else 3))
            assert reply.startswith(b"HTTP/1."), what
            sent += n
        deadline = time.monotonic() + 10
        found: list[events.Event] = []
        while time.monotonic() < deadline:
            found = [
                e for e in events.read_all((home / "events").glob("*.jsonl")) if e.kind == "request"
            ]
            if len(found) >= sent:
                break
            time.sleep(0.2)
        assert len(found) == sent
    finally:
        subprocess.run([*VMCTL, "stop", "s1"], env=env, timeout=60, check=False)
    for f in home.rglob("*"):
        if f.is_file() and f.suffix in (".log", ".jsonl", ".json"):
            assert "Traceback" not in f.read_text(errors="replace"), f
