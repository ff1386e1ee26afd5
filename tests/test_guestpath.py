"""The guest path without a guest: connections handed over exactly as QEMU hands them.

libslirp's guestfwd `cmd:` starts the forwarder with one end of a UNIX
socketpair as its stdin and stdout; these tests do the same, keep the other
end as "the guest", and run the real sidecar process against a real gateway
(with a stand-in llama-server behind it) found the way the sidecar finds it:
through a running server's folder under VMCTL_HOME (tests/gateway_peer.py).
The host-client bridge's routes are tested in test_bridge.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.guest import stand_in_qemu
from gateway_peer import REQ, home, read_until_closed, served
from vmctl import events, paths
from vmctl.procs import ProcessRef
from vmctl.sidecars import guestlaunch
from vmctl.sidecars.httpclock import RequestClock

__all__ = ["home", "served"]  # fixtures, used by name


def start_sidecar(
    home: Path,
    port: int,
    *,
    qemu: int | None = None,
    owner: int | None = None,
    unrecorded: bool = False,
    **kw: float,
) -> tuple[subprocess.Popen[bytes], paths.InstancePaths]:
    ip = paths.instance("box")
    paths.private_dir(ip.root)
    meta = {"name": "box", "started": time.time(), "spec": {}}
    meta["qemu"] = None if unrecorded else ProcessRef.of(qemu or os.getpid()).to_json()
    meta["owner"] = ProcessRef.of(owner).to_json() if owner else None
    ip.meta.write_text(json.dumps(meta))
    config = guestlaunch.SidecarConfig(
        "box",
        str(ip.sidecar),
        str(ip.meta),
        "127.0.0.1",
        port,
        **kw,  # type: ignore[arg-type]
    )
    guestlaunch.write_config(ip.sidecar_config, config)
    guestlaunch.write_forwarder(ip.relay, ip.sidecar, "box")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmctl.sidecars.guestpath", str(ip.sidecar_config)],
        env={**os.environ, "VMCTL_HOME": str(home)},
    )
    for _ in range(200):
        if ip.sidecar.exists():
            break
        time.sleep(0.05)
    return proc, ip


@pytest.fixture
def sidecar(home: Path, served: int) -> Iterator[paths.InstancePaths]:
    proc, ip = start_sidecar(home, served, max_conns=3, slow_s=1.0, idle_s=3.0)
    yield ip
    proc.terminate()
    proc.wait(10)


def guest_connect(ip: paths.InstancePaths) -> socket.socket:
    """What libslirp does for one guest connection: a socketpair, the forwarder on one end."""
    guest, fwd_end = socket.socketpair()
    subprocess.run([str(ip.relay)], stdin=fwd_end, stdout=fwd_end, check=True, timeout=20)
    fwd_end.close()
    guest.settimeout(5)
    return guest


def guest_events(home: Path) -> list[events.Event]:
    return list(events.read_file(home / "events" / "guest-box.jsonl"))


async def wait_for(cond: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met")


async def test_requests_are_the_guests_and_a_forged_header_is_ignored(
    home: Path, sidecar: paths.InstancePaths
) -> None:
    g = await asyncio.to_thread(guest_connect, sidecar)
    sent = REQ + REQ[:-2] + b"Connection: close\r\n\r\n"  # keep-alive, pipelined
    g.sendall(sent)
    reply = await read_until_closed(g)
    g.close()
    assert reply.count(b"HTTP/1.1 200") == 2
    await wait_for(lambda: any(e.kind == "connection" for e in guest_events(home)))
    got = guest_events(home)
    requests = [e for e in got if e.kind == "request"]
    assert [(e.who, e.by, e.server, e.status) for e in requests] == [
        ("box", "gateway", "s1", 200)
    ] * 2
    (conn,) = [e for e in got if e.kind == "connection"]
    assert conn.bytes_up == len(sent)
    assert conn.bytes_down == len(reply) and conn.detail == "2 requests"


async def test_connections_past_the_cap_are_refused_and_audited(
    home: Path, sidecar: paths.InstancePaths
) -> None:
    held = [await asyncio.to_thread(guest_connect, sidecar) for _ in range(3)]
    await asyncio.sleep(0.5)
    extra = [await asyncio.to_thread(guest_connect, sidecar) for _ in range(2)]
    for g in extra:
        reply = await read_until_closed(g)
        assert reply.startswith(b"HTTP/1.1 503") and b"3 model connections" in reply
    refused = [e for e in guest_events(home) if e.action == "refuse"]
    assert [e.reason for e in refused] == ["too_many_connections"] * 2
    # The held ones still work, and once they close a new one is let in.
    held[0].sendall(REQ[:-2] + b"Connection: close\r\n\r\n")
    assert (await read_until_closed(held[0])).startswith(b"HTTP/1.1 200")
    for g in held:
        g.close()
    await wait_for(lambda: len([e for e in guest_events(home) if e.action == "close"]) == 3)
    g = await asyncio.to_thread(guest_connect, sidecar)
    g.sendall(REQ[:-2] + b"Connection: close\r\n\r\n")
    assert (await read_until_closed(g)).startswith(b"HTTP/1.1 200")


async def test_slow_and_idle_connections_are_closed(
    home: Path, sidecar: paths.InstancePaths
) -> None:
    slow = await asyncio.to_thread(guest_connect, sidecar)
    slow.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    idle = await asyncio.to_thread(guest_connect, sidecar)
    t0 = time.monotonic()
    assert await read_until_closed(slow, wait=10) == b""
    assert time.monotonic() - t0 < 4
    assert await read_until_closed(idle, wait=10) == b""
    assert time.monotonic() - t0 < 8
    reasons = sorted(str(e.reason) for e in guest_events(home) if e.action == "close")
    assert reasons == ["idle_timeout", "slow_request"]


async def test_no_sidecar_the_forwarder_answers_502_and_audits(home: Path, served: int) -> None:
    ip = paths.instance("box")
    paths.private_dir(ip.root)
    guestlaunch.write_forwarder(ip.relay, ip.sidecar, "box")
    g = await asyncio.to_thread(guest_connect, ip)
    assert (await read_until_closed(g)).startswith(b"HTTP/1.1 502")
    (e,) = guest_events(home)
    assert (e.action, e.reason, e.by) == ("refuse", "sidecar_unreachable", "forwarder")


def test_sidecar_exits_with_qemu_and_stops_a_booting_guest_whose_owner_died(home: Path) -> None:
    qemu = subprocess.Popen(["sleep", "60"])
    proc, _ = start_sidecar(home, 9, qemu=qemu.pid)
    qemu.kill()
    qemu.wait()
    assert proc.wait(5) == 0
    # `vmctl up` (the owner) SIGKILLed while the guest boots: QEMU is stopped too.
    owner = subprocess.Popen(["sleep", "60"])
    qemu = subprocess.Popen(["sleep", "60"])
    proc, ip = start_sidecar(home, 9, qemu=qemu.pid, owner=owner.pid)
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    assert qemu.wait(10) == -signal.SIGTERM
    assert proc.wait(5) == 0
    assert [e.reason for e in guest_events(home) if e.kind == "lifecycle"] == ["owner_died"]
    meta = json.loads(ip.meta.read_text())  # said once: no reaper finds them to say it again
    assert meta["qemu"] is None and meta["owner"] is None and meta["name"] == "box"


def test_the_watchdog_finds_a_stand_in_qemu_its_killed_owner_never_recorded(home: Path) -> None:
    """`vmctl up` SIGKILLed between QEMU's fork and its record: milliseconds
    no test can aim at, so a stand-in runs where that QEMU would."""
    ip = paths.instance("box")
    paths.private_dir(ip.root)
    stray = stand_in_qemu(ip)
    owner = subprocess.Popen(["sleep", "60"])
    proc, _ = start_sidecar(home, 9, owner=owner.pid, unrecorded=True)
    try:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        assert stray.wait(10) == -signal.SIGTERM
        assert proc.wait(5) == 0
        assert [e.reason for e in guest_events(home) if e.kind == "lifecycle"] == ["owner_died"]
    finally:
        stray.kill()
        stray.wait()


def test_request_clock_frames_pipelined_bodies_and_chunks() -> None:
    seen: list[tuple[str, str]] = []
    c = RequestClock(lambda m, p: seen.append((m, p)))
    c.feed(b"POST /a HTTP/1.1\r\nContent-Length: 4\r\n\r\nab", 1.0)
    assert c.started == 1.0
    c.feed(b"cdGET /b HTTP/1.1\r\n\r\n", 2.0)
    assert c.started is None and seen == [("POST", "/a"), ("GET", "/b")]
    c.feed(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", 3.0)
    assert c.started == 3.0
    c.feed(b"0\r\n\r\n", 4.0)
    assert c.started is None and c.requests == 3
    c.feed(b"GET /d HTTP/1.1\r\nX: ", 5.0)
    assert c.started == 5.0  # a trickled head keeps its first byte's time
    c.feed(b"y\r\n", 9.0)
    assert c.started == 5.0


async def test_the_egress_proxy_takes_the_model_address_through_the_guests_route(
    home: Path, served: int
) -> None:
    """A tool that ignores NO_PROXY asks the egress proxy for the model: still the guest's."""
    from vmctl.sidecars.proxy import ProxyConfig
    from vmctl.sidecars.proxy_serve import ProxyThread

    cfg = ProxyConfig(
        "guest", "box", "balanced", {}, paths.events_dir(),
        model=("127.0.0.1", served), model_as=("10.0.2.2", 8080),
    )  # fmt: skip
    px = ProxyThread(cfg, home / "px.sock").start()
    try:
        c = socket.socket(socket.AF_UNIX)
        await asyncio.get_running_loop().sock_connect(c, str(px.socket_path))
        c.sendall(b"GET http://10.0.2.2:8080/v1/models HTTP/1.1\r\nHost: 10.0.2.2\r\n\r\n")
        assert (await read_until_closed(c, wait=3)).startswith(b"HTTP/1.1 200")
        c.close()
    finally:
        px.close()
    got = [e for e in guest_events(home) if e.kind == "request"]
    assert [(e.who, e.by, e.server) for e in got] == [("box", "gateway", "s1")]
