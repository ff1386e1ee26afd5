"""The gateway's own ceiling and the guest path's memory, with no model at all.

Used by bench/serve.py. A real `vmctl serve --no-sandbox` (supervisor and
gateway in their own process) fronts tests/standin_llama.py streaming as fast
as it can; the same requests go through the gateway and straight to the
stand-in's UNIX socket, alternated so a busy machine hits both alike. The
guest path is the real sidecar, handed connections exactly as QEMU's
guestfwd does (a socketpair, the forwarder on one end).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "standin_llama.py"
PORT = 18191
#: Enough events that the stream, not the request's setup, is what is timed.
CHUNKS = 30000
HELD = 64


def _env(home: Path) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "orchestrator"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "VMCTL_HOME": str(home), "PYTHONPATH": path, "VMCTL_QUIET": "1"}


def _serve(home: Path) -> None:
    wrapper = home / "standin"
    wrapper.write_text(f'#!/bin/sh\nSTANDIN_DELAY=0 exec {sys.executable} {STANDIN} "$@"\n')
    wrapper.chmod(0o755)
    argv = [sys.executable, "-m", "vmctl", "serve", "--detach", "--no-sandbox", "--name", "c1"]
    argv += ["--llama-server", str(wrapper), "--port", str(PORT)]
    subprocess.run(argv, env=_env(home), check=True, capture_output=True, timeout=120)


async def _stream(session: aiohttp.ClientSession, url: str) -> float:
    """SSE events per second for one fast stream, first byte to last.

    The time to the first byte is measured on its own (`_ttfb`); here it
    would swamp the rate of a stream that lasts milliseconds.
    """
    body = {"model": "m", "stream": True, "max_tokens": CHUNKS}
    start = 0.0
    events = 0
    async with session.post(url, json=body) as r:
        async for chunk in r.content.iter_any():
            start = start or time.perf_counter()
            events += chunk.count(b"data: ")
    return events / (time.perf_counter() - start)


async def _ttfb(session: aiohttp.ClientSession, url: str) -> float:
    start = time.perf_counter()
    async with session.get(url) as r:
        await r.content.readany()
        return (time.perf_counter() - start) * 1000


async def _gateway(home: Path, rounds: int) -> dict[str, float]:
    sock = home / "servers" / "c1" / "run" / "llama.sock"
    gw = f"http://127.0.0.1:{PORT}"
    timeout = aiohttp.ClientTimeout(total=120)
    async with (
        aiohttp.ClientSession(timeout=timeout) as tcp,
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(sock)), timeout=timeout) as unix,
    ):
        pairs = ((tcp, gw), (unix, "http://llama"))
        for s, base in pairs:  # warm both paths (connections, caches)
            await _stream(s, base + "/v1/chat/completions")
        via, direct = [], []
        for _ in range(rounds * 4):  # a stream lasts ~0.1 s: more rounds, a steadier median
            via.append(await _stream(tcp, gw + "/v1/chat/completions"))
            direct.append(await _stream(unix, "http://llama/v1/chat/completions"))
        t_via, t_direct = [], []
        for _ in range(300):
            t_via.append(await _ttfb(tcp, gw + "/health"))
            t_direct.append(await _ttfb(unix, "http://llama/health"))

    def p99(xs: list[float]) -> float:
        return statistics.quantiles(xs, n=100)[98]

    return {
        "ceiling_chunks_ratio": statistics.median(via) / statistics.median(direct),
        "ceiling_gateway_chunks_per_s": statistics.median(via),
        "ceiling_direct_chunks_per_s": statistics.median(direct),
        "ttfb_added_median_ms": statistics.median(t_via) - statistics.median(t_direct),
        "ttfb_added_p99_ms": p99(t_via) - p99(t_direct),
    }


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _guest_path(home: Path) -> dict[str, float]:
    """Hold HELD guest connections open through the real sidecar and gateway route."""
    os.environ.update(_env(home))
    sys.path.insert(0, str(ROOT / "orchestrator"))
    from vmctl import paths
    from vmctl.procs import ProcessRef
    from vmctl.sidecars import guestlaunch

    ip = paths.instance("bench")
    paths.private_dir(ip.root)
    meta = {"name": "bench", "started": time.time(), "spec": {}, "owner": None}
    meta["qemu"] = ProcessRef.of(os.getpid()).to_json()
    ip.meta.write_text(json.dumps(meta))
    config = guestlaunch.SidecarConfig(
        "bench", str(ip.sidecar), str(ip.meta), "127.0.0.1", PORT, max_conns=HELD
    )
    pid = guestlaunch.listening(ip, guestlaunch.spawn(ip, config))
    gateway = json.loads((home / "servers/c1/server.json").read_text())["supervisor"]["pid"]
    time.sleep(0.5)
    before = _rss_kb(pid) + _rss_kb(gateway)
    held = []
    for _ in range(HELD):
        guest, end = socket.socketpair()
        subprocess.run([str(ip.relay)], stdin=end, stdout=end, check=True)
        end.close()
        guest.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        held.append(guest)
    for g in held:
        g.settimeout(10)
        g.recv(4096)  # answered; the connection stays open (keep-alive)
    time.sleep(0.5)
    grown = _rss_kb(pid) + _rss_kb(gateway) - before
    for g in held:
        g.close()
    os.kill(pid, 15)
    return {"guest_conn_kb": grown / HELD, "guest_conns_held": float(HELD)}


def ceiling(home: Path, rounds: int) -> dict[str, float]:
    _serve(home)
    try:
        results = asyncio.run(_gateway(home, rounds))
        results.update(_guest_path(home))
        return results
    finally:
        subprocess.run(
            [sys.executable, "-m", "vmctl", "stop", "c1"], env=_env(home), capture_output=True,
            check=False, timeout=60,
        )  # fmt: skip
