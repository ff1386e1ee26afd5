"""Port mirroring, live, with two real micro guests under TCG.

Guest `a` serves a page with busybox httpd; the host fetches it on
127.0.0.1 within a bound, and only there. Guest `b` listens on the same
port: it is skipped and the event names `a`. A port busy on the host is
skipped and logged; a port the guest stops listening on disappears.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port, need
from guests import vmctl
from vmctl.images.choose import resolve_image

pytestmark = pytest.mark.qemu
#: Seconds from the guest's listen() to a working host forward. The target is
#: 1 s (bench/boot.py measures it); a loaded 2-core TCG host gets slack.
BOUND_S = 5.0


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    need(bool(subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).stdout), "qemu")
    home = tmp_path_factory.mktemp("mh")
    os.environ.setdefault("VMCTL_CACHE", str(Path.home() / ".cache/vmctl"))
    e = {**os.environ, "VMCTL_HOME": str(home), "VMCTL_QUIET": "1"}
    image = str(resolve_image("micro").path)
    ws = tmp_path_factory.mktemp("mws")
    try:
        for name in ("a", "b"):
            r = vmctl(e, "up", "-d", str(ws), "--name", name, "--image", image, "--detach",
                      "--accel", "tcg", "--timeout", "120", "--net", "model",
                      "--model-endpoint", "127.0.0.1:9", "--model", "m",
                      timeout=180)  # fmt: skip
            assert r.returncode == 0, r.stderr
        yield e
    finally:
        for name in ("a", "b"):
            vmctl(e, "down", name, timeout=60)


def serve(env: dict[str, str], name: str, port: int) -> None:
    """busybox httpd in the guest on `port`, its pid in /tmp/httpd-PORT."""
    script = (
        f"mkdir -p /tmp/www && echo page-from-{name} > /tmp/www/index.html && "
        f"httpd -f -p {port} -h /tmp/www </dev/null >/dev/null 2>&1 & echo $! > /tmp/httpd-{port}"
    )
    assert vmctl(env, "exec", name, "--", "sh", "-c", script).returncode == 0


def stop(env: dict[str, str], name: str, port: int) -> None:
    assert (
        vmctl(env, "exec", name, "--", "sh", "-c", f"kill $(cat /tmp/httpd-{port})").returncode == 0
    )


def fetch(port: int, within: float) -> tuple[str, float]:
    start = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as resp:
                return resp.read().decode(), time.monotonic() - start
        except OSError:
            if time.monotonic() - start > within:
                raise
            time.sleep(0.05)


def host_listeners(port: int) -> list[str]:
    """Local addresses (kernel hex) of every host socket listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, st = line.split()[1], line.split()[3]
            if st == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local.rsplit(":", 1)[0])
    return found


def listeners_of(pid: int) -> list[str]:
    """Local addresses (kernel hex) of every TCP socket process `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                found.append(cols[1].rsplit(":", 1)[0])
    return found


def events(env: dict[str, str], name: str) -> list[dict[str, object]]:
    path = Path(env["VMCTL_HOME"]) / "events" / f"guest-{name}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_for(pred: object, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return bool(pred())  # type: ignore[operator]


def test_guest_port_appears_on_loopback_only_then_goes(env: dict[str, str]) -> None:
    port = free_port()
    serve(env, "a", port)
    page, took = fetch(port, BOUND_S)
    assert page == "page-from-a\n" and took < BOUND_S
    assert host_listeners(port) == ["0100007F"], "the forward must bind 127.0.0.1 only"
    status = json.loads(vmctl(env, "status", "a", "--json").stdout)
    assert status["mirror"]["state"] == "on" and port in status["mirror"]["live"]
    qemu_listens = listeners_of(status["pid"])
    assert qemu_listens and set(qemu_listens) == {"0100007F"}, "QEMU listens beyond loopback"

    serve(env, "b", port)  # the same port in a second guest
    assert wait_for(lambda: any(e["action"] == "skip" for e in events(env, "b")), BOUND_S + 5)
    skip = next(e for e in events(env, "b") if e["action"] == "skip")
    assert skip["port"] == port and "guest a" in str(skip["reason"]) and skip["decision"] == "deny"
    stop(env, "b", port)

    stop(env, "a", port)
    assert wait_for(lambda: not host_listeners(port), BOUND_S), "the forward outlived the listener"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    kinds = [(e["action"], e["port"]) for e in events(env, "a") if e["kind"] == "forward"]
    assert ("add", port) in kinds and ("remove", port) in kinds


def test_port_busy_on_host_is_skipped_and_logged(env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        serve(env, "a", port)
        assert wait_for(
            lambda: any(e["action"] == "skip" and e["port"] == port for e in events(env, "a")),
            BOUND_S + 5,
        )
        skip = [e for e in events(env, "a") if e["action"] == "skip" and e["port"] == port][-1]
        assert "in use on the host" in str(skip["reason"])
        out = vmctl(env, "status", "a").stdout
        assert f"{port} skipped: host port {port} is already in use" in out
    stop(env, "a", port)


def test_guest_never_takes_the_model_gateway_port(env: dict[str, str]) -> None:
    """A guest listening on 8080 must not pose as vmctl's model to host clients and other guests."""
    serve(env, "a", 8080)
    assert wait_for(
        lambda: any(e["action"] == "skip" and e["port"] == 8080 for e in events(env, "a")),
        BOUND_S + 5,
    )
    skip = [e for e in events(env, "a") if e["action"] == "skip" and e["port"] == 8080][-1]
    assert "model gateway" in str(skip["reason"]) and skip["decision"] == "deny"
    status = json.loads(vmctl(env, "status", "a", "--json").stdout)
    assert 8080 not in status["mirror"]["live"] and "8080" in status["mirror"]["skipped"]
    stop(env, "a", 8080)
