"""Where the egress proxy runs: a thread inside vmctl, or a guest's own sidecar.

`ProxyThread` serves plain streams on a UNIX socket (the bridge carries a
`vmctl run` client's connections there). The guest sidecar
(`python -m vmctl.sidecars.proxy_serve ...`) listens on a UNIX socket for
the guestfwd connector: each connection starts with one byte, `F` with the
guest connection's socket attached (SCM_RIGHTS), or `S` followed by the
stream itself when the connector could not pass a socket. The sidecar
exits when its socket file goes away (the guest's folder was removed) or
on SIGTERM from `vmctl down`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from vmctl import agents, contract, egress, paths
from vmctl.logtail import tail_lines
from vmctl.poll import Timeout, wait_until
from vmctl.procs import ProcessRef
from vmctl.sidecars import hold
from vmctl.sidecars.proxy import HEAD_MAX, EgressProxy, ProxyConfig

FD_TIMEOUT_S = 5.0


async def _serve_unix(proxy: EgressProxy, path: Path) -> asyncio.Server:
    path.unlink(missing_ok=True)
    old = os.umask(0o077)
    try:
        return await asyncio.start_unix_server(proxy.handle, str(path), limit=HEAD_MAX)
    finally:
        os.umask(old)


class ProxyThread:
    """The proxy on a UNIX socket, in a daemon thread of this process."""

    def __init__(self, config: ProxyConfig, socket_path: Path):
        self.proxy = EgressProxy(config)
        self.socket_path = socket_path
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> ProxyThread:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(_serve_unix(self.proxy, self.socket_path), self.loop)
        self._server = fut.result(timeout=10)
        return self

    def close(self) -> None:
        if self._server is not None:
            self.loop.call_soon_threadsafe(self._server.close)
            self._server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        """Where the bridge listens for it inside a sandbox (the contract's proxy port)."""
        return int(contract.raw()["network"]["proxy_port"])

    @property
    def bridge_args(self) -> list[str]:
        return ["--listen", f"127.0.0.1:{self.port}", "--socket", str(self.socket_path)]

    @property
    def env(self) -> dict[str, str]:
        """HTTP(S)_PROXY at the bridged port; the model (loopback) is reached directly."""
        return agents.proxy_env(f"http://127.0.0.1:{self.port}", "127.0.0.1,localhost")


def client_proxy(
    client: str, preset: str, resolve: tuple[str, ...], folder: Path, model: tuple[str, int]
) -> ProxyThread:
    """The proxy for one `vmctl run` of `client`, on `folder`/px.sock (not started).

    The client knows the model as 127.0.0.1:PORT (the bridge); asked through
    the proxy for that, the proxy goes to the model itself.
    """
    config = ProxyConfig("client", client, preset, egress.resolve_map(resolve), paths.events_dir())
    config.model, config.model_as = model, ("127.0.0.1", model[1])
    return ProxyThread(config, paths.check_socket_path(folder / "px.sock"))


async def _handoff(proxy: EgressProxy, conn: socket.socket) -> None:
    """One connector: take the guest's socket it passes, or its stream."""
    loop = asyncio.get_running_loop()
    conn.setblocking(False)
    try:
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(conn.fileno(), wake)
        try:
            await asyncio.wait_for(ready, FD_TIMEOUT_S)
        finally:
            loop.remove_reader(conn.fileno())
        msg, fds, _flags, _addr = socket.recv_fds(conn, 1, 1)
    except (TimeoutError, OSError):
        conn.close()
        return
    if msg == b"F" and len(fds) == 1:
        conn.close()
        conn = socket.socket(fileno=fds[0])
        conn.setblocking(False)
    else:
        for fd in fds:
            os.close(fd)
        if msg != b"S":
            conn.close()
            return
    reader, writer = await asyncio.open_connection(sock=conn, limit=HEAD_MAX)
    await proxy.handle(reader, writer)


def _guest_gone(meta: Path | None) -> bool:
    """True once the guest's QEMU, recorded in its instance.json, has exited."""
    if meta is None:
        return False
    try:
        ref = json.loads(meta.read_text()).get("qemu")
    except (OSError, ValueError, AttributeError):
        return not meta.parent.exists()
    if ref is None:
        return False  # QEMU not started yet
    try:
        return not ProcessRef.from_json(ref).alive()
    except ValueError:
        return True


async def serve_sidecar(config: ProxyConfig, path: Path, meta: Path | None = None) -> None:
    proxy = EgressProxy(config)
    listener = hold.listener(str(path), 64)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    inode = path.stat().st_ino
    tasks: set[asyncio.Task[None]] = set()

    async def accept() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = asyncio.ensure_future(_handoff(proxy, conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = asyncio.ensure_future(accept())
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)
        try:
            if path.stat().st_ino != inode or _guest_gone(meta):
                break
        except OSError:
            break  # the socket (the guest's folder) is gone
    acceptor.cancel()
    for t in list(tasks):
        t.cancel()
    listener.close()
    with contextlib.suppress(OSError):
        if path.stat().st_ino == inode:
            path.unlink()


CONNECT_PY = Path(__file__).with_name("proxy_connect.py")


def write_connect_script(script: Path, socket_path: Path) -> None:
    """The guestfwd `cmd:` script (comma-free path): the connector for this guest."""
    argv = [sys.executable, "-I", "-S", str(CONNECT_PY), str(socket_path)]
    script.write_text(f"#!/bin/sh\nexec {shlex.join(argv)}\n")
    script.chmod(0o700)


def spawn_sidecar(
    socket_path: Path,
    who: str,
    preset: str,
    resolve: tuple[str, ...],
    log: Path,
    home: Path,
    meta: Path,
    model: tuple[str, int] | None = None,
    gate: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start a guest's proxy in its own session; `listening` waits for its socket.

    It stops on SIGTERM (`vmctl down`), or by itself within seconds once
    the QEMU recorded in `meta` is gone (a killed vmctl, a guest that
    powered off) or the guest's folder is removed. With `gate` (a pipe's
    read end), it starts up once that closes (vmctl.sidecars.hold).
    """
    args = ["--socket", str(socket_path), "--who-kind", "guest", "--who", who, "--preset", preset]
    args += ["--events", str(home / "events"), "--instance-meta", str(meta)]
    for r in resolve:
        args += ["--resolve", r]
    if model is not None:
        args += ["--model", f"{model[0]}:{model[1]}"]
    argv = hold.argv(gate, str(socket_path), "vmctl.sidecars.proxy_serve", args)
    keep = ("PATH", "LANG", "LC_ALL", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keep} | {"VMCTL_HOME": str(home)}
    socket_path.unlink(missing_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=env, cwd=socket_path.parent, start_new_session=True,
            pass_fds=() if gate is None else (gate,),
        )  # fmt: skip


def listening(proc: subprocess.Popen[bytes], socket_path: Path, log: Path) -> ProcessRef:
    """The spawned proxy once its socket exists; OSError if it died or hung."""

    def died() -> str | None:
        return None if proc.poll() is None else f"exited with status {proc.returncode}"

    try:
        wait_until(
            lambda: True if socket_path.exists() else None,
            timeout=20, what="the egress proxy", interval=0.05, abort=died,
        )  # fmt: skip
    except Timeout:
        proc.kill()
        raise OSError(f"the egress proxy did not start: {tail_lines(log, 3) or log}") from None
    return ProcessRef.of(proc.pid)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmctl.sidecars.proxy_serve", description=__doc__)
    p.add_argument("--socket", required=True, type=Path)
    p.add_argument("--who-kind", required=True, choices=("guest", "client"))
    p.add_argument("--who", required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--resolve", action="append", default=[], help="HOST:ADDR")
    p.add_argument("--events", required=True, type=Path, help="the event log folder")
    p.add_argument("--instance-meta", type=Path, help="exit once this guest's QEMU is gone")
    p.add_argument("--model", help="HOST:PORT of the model, which the guest knows by the contract")
    a = p.parse_args(argv)
    config = ProxyConfig(a.who_kind, a.who, a.preset, egress.resolve_map(a.resolve), a.events)
    if a.model:
        host, _, port = a.model.rpartition(":")
        net = contract.raw()["network"]
        config.model = (host.strip("[]"), int(port))
        config.model_as = (str(net["model_host"]), int(net["model_port"]))
    asyncio.run(serve_sidecar(config, a.socket, a.instance_meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
