"""A guest's one guarded way out: a long-lived sidecar per guest, bounded and audited.

QEMU's `guestfwd=tcp:IP:PORT-cmd:FORWARDER` starts FORWARDER for every TCP
connection the guest opens to IP:PORT, with the connection on its stdin: one
end of a UNIX socketpair (libslirp's fork_exec). The forwarder (a few lines
of stdlib Python written by `write_forwarder`) passes that descriptor to this
sidecar over `sidecar.sock` with SCM_RIGHTS, naming its destination, and
exits at once: no process is held per connection, so a held connection costs
the host only the sidecar's buffers. (QEMU's other form,
`guestfwd=...-chardev:ID`, needs no process but carries one connection at a
time, so the guest's concurrent requests would queue behind each other.)

The sidecar, for each connection to a destination (today `model`; the egress
proxy can register a second): refuses past `max_conns` (HTTP 503, audited),
opens the gateway's route with this guest's name (vmctl.routes; the gateway
then audits every request on the connection as this guest, keep-alive and
pipelined ones included), or the plain endpoint when no vmctl server serves
it (then it audits each request line itself), copies both ways, closes idle
connections and requests whose head or body trickles in too slowly
(slowloris), and writes one `connection` event when the connection ends.

It carries the workspace's executable bits between host and guest
(vmctl.sidecars.modes) and applies pending ones when `vmctl exec` asks
(`settle`), so a guest `chmod +x` is on the host when exec returns.

It also watches its guest: it exits when QEMU is gone, and when the
`vmctl up` that owns a guest still booting dies (even by SIGKILL), it stops
that QEMU first, so nothing is left running. And it keeps the workspace's
disk floor: below it the guest is paused until space is back
(vmctl.sidecars.floor).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from vmctl import events, paths, routes
from vmctl.events import Event, EventLog
from vmctl.procs import ProcessRef
from vmctl.sidecars import floor, hold, modes
from vmctl.sidecars.guestlaunch import SidecarConfig, unrecorded_qemu
from vmctl.sidecars.httpclock import RequestClock
from vmctl.state import StateError, read_json, write_json

WATCH_S = 0.5
CHUNK = 65536
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)


def _json_error(message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error", "code": 503}})
    return BUSY % (len(body), body.encode())


class Sidecar:
    """Receives guest connections from forwarders and serves each destination."""

    def __init__(self, config: SidecarConfig):
        self.config = config
        self.active = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.log = EventLog(events.subject_file(paths.events_dir(), "guest", config.name))
        self.destinations: dict[bytes, Callable[[socket.socket], Awaitable[None]]] = {}
        self.modes: modes.Reconciler | None = None
        if config.target_host:
            self.destinations[b"model"] = self.model

    def event(self, kind: str, action: str, **fields: object) -> None:
        with contextlib.suppress(OSError):
            self.log.write(
                Event(kind, "guest", self.config.name, "sidecar", action, **fields)  # type: ignore[arg-type]
            )

    # ---- receiving descriptors ----
    async def serve(self) -> None:
        listener = hold.listener(self.config.listen, 256)
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = asyncio.create_task(self._receive(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _receive(self, conn: socket.socket) -> None:
        """One forwarder: its destination name and the guest connection's descriptor."""
        loop = asyncio.get_running_loop()
        with conn:
            try:
                ready = asyncio.Event()
                loop.add_reader(conn.fileno(), ready.set)
                try:
                    await asyncio.wait_for(ready.wait(), 5)
                finally:
                    loop.remove_reader(conn.fileno())
                dest, fds, _, _ = socket.recv_fds(conn, 64, 4)
                if not fds and dest == modes.SETTLE:  # `vmctl exec` returns after this
                    if self.modes is not None:
                        self.modes.drain()
                    conn.send(b"ok")
            except (OSError, TimeoutError):
                return
        if not fds:
            return
        for extra in fds[1:]:
            os.close(extra)
        guest = socket.socket(fileno=fds[0])
        handler = self.destinations.get(dest)
        if handler is None:
            guest.close()
            self.event("connection", "refuse", decision="deny", reason="unknown_destination")
            return
        await handler(guest)

    # ---- the model destination ----
    async def model(self, guest: socket.socket) -> None:
        cfg = self.config
        where = {"host": cfg.target_host, "port": cfg.target_port}
        if self.active >= cfg.max_conns:
            with contextlib.suppress(OSError):
                guest.setblocking(False)
                guest.send(_json_error(f"{cfg.max_conns} model connections already open"))
            guest.close()
            self.event(
                "connection", "refuse", decision="deny", reason="too_many_connections",
                detail=f"limit {cfg.max_conns}", **where,
            )  # fmt: skip
            return
        self.active += 1
        try:
            await self._model(guest, where)
        finally:
            self.active -= 1

    async def _model(self, guest: socket.socket, where: dict[str, object]) -> None:
        cfg = self.config
        start = time.monotonic()
        route = routes.find_route(cfg.target_host, cfg.target_port)
        g_reader, g_writer = await asyncio.open_connection(sock=guest, limit=CHUNK)
        try:
            if route is not None:
                u_reader, u_writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(route), limit=CHUNK), 5
                )
                u_writer.write(routes.preamble("guest", cfg.name))
            else:
                u_reader, u_writer = await asyncio.wait_for(
                    asyncio.open_connection(cfg.target_host, cfg.target_port, limit=CHUNK), 5
                )
        except (OSError, TimeoutError) as e:
            g_writer.write(
                _json_error("the model endpoint is not reachable").replace(b"503", b"502", 1)
            )
            with contextlib.suppress(OSError):
                await g_writer.drain()
            g_writer.close()
            self.event(
                "connection", "refuse", decision="deny", reason="upstream_unreachable",
                detail=events.safe(str(e))[:200], **where,  # type: ignore[arg-type]
            )  # fmt: skip
            return
        clock = RequestClock(None if route is not None else self._request_seen)
        reason = await self._pump(g_reader, g_writer, u_reader, u_writer, clock)
        for w in (g_writer, u_writer):
            w.close()
        self.event(
            "connection", "close", decision="allow", reason=reason, bytes_up=clock.bytes_up,
            bytes_down=clock.bytes_down, duration_ms=round((time.monotonic() - start) * 1000, 1),
            detail=f"{clock.requests} requests" + ("" if route else " (unrouted)"),
            **where,  # type: ignore[arg-type]
        )  # fmt: skip

    def _request_seen(self, method: str, path: str) -> None:
        """Unrouted endpoints have no gateway to audit them: log each request line here."""
        self.event("request", f"{method} {path}", method=method, path=path, decision="allow")

    async def _pump(
        self,
        g_reader: asyncio.StreamReader,
        g_writer: asyncio.StreamWriter,
        u_reader: asyncio.StreamReader,
        u_writer: asyncio.StreamWriter,
        clock: RequestClock,
    ) -> str:
        """Copy both ways until either side is done or a timeout fires; the reason."""
        cfg = self.config
        last = [time.monotonic()]

        async def up() -> str:
            while data := await g_reader.read(CHUNK):
                last[0] = time.monotonic()
                clock.feed(data, last[0])
                u_writer.write(data)
                await u_writer.drain()
            with contextlib.suppress(OSError):
                u_writer.write_eof()
            return "guest_closed"

        async def down() -> str:
            while data := await u_reader.read(CHUNK):
                last[0] = time.monotonic()
                clock.bytes_down += len(data)
                g_writer.write(data)
                await g_writer.drain()
            return "upstream_closed"

        async def watch() -> str:
            while True:
                await asyncio.sleep(min(1.0, cfg.slow_s / 4))
                now = time.monotonic()
                if clock.started is not None and now - clock.started > cfg.slow_s:
                    return "slow_request"
                if now - last[0] > cfg.idle_s:
                    return "idle_timeout"

        tasks = {asyncio.create_task(c) for c in (up(), down(), watch())}
        reason = "closed"
        try:
            while tasks:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    exc = t.exception()
                    result = "reset" if exc is not None else t.result()
                    if result == "guest_closed":  # a half-close: the reply may still come
                        reason = result
                        continue
                    return reason if result == "upstream_closed" and reason != "closed" else result
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return reason

    # ---- the guest's lifetime ----
    async def watch_guest(self) -> None:
        """Exit when QEMU is gone; stop a booting guest whose owner died; keep the floor."""
        seen_qemu = False
        ipaths = paths.InstancePaths(Path(self.config.meta).parent)
        guard = None
        if self.config.disk_floor > 0 and self.config.disk_path:
            guard = floor.Guard(
                self.config.disk_path, self.config.disk_floor, floor.qmp_switches(ipaths.qmp),
                self.event, state=ipaths.disk_floor, marker=ipaths.paused,
            )  # fmt: skip
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                meta = read_json(Path(self.config.meta), {})
            except StateError:
                return  # the folder is gone (an ephemeral guest was removed)
            qemu = _ref(meta.get("qemu"))
            owner = _ref(meta.get("owner"))
            if qemu is not None:
                seen_qemu = True
            if owner is not None and not owner.alive():
                # Killed between QEMU's fork and its record: found by its folder.
                stray = [qemu] if qemu is not None else unrecorded_qemu(ipaths)
                stopped = [ref for ref in stray if ref.alive()]
                for ref in stopped:
                    await asyncio.to_thread(ref.terminate, 5.0)
                how = "QEMU stopped" if stopped else "no QEMU left running"
                self.event("lifecycle", "reap", reason="owner_died", detail=f"vmctl up died; {how}")
                # Said here, once: the record no longer names them, so no reaper says it again.
                with contextlib.suppress(OSError):
                    write_json(Path(self.config.meta), {**meta, "qemu": None, "owner": None})
                return
            if seen_qemu and (qemu is None or not qemu.alive()):
                return
            if guard is not None and qemu is not None:
                await asyncio.to_thread(guard.tick)


def _ref(data: object) -> ProcessRef | None:
    try:
        return ProcessRef.from_json(data)
    except ValueError:
        return None


async def run(config: SidecarConfig) -> None:
    sidecar = Sidecar(config)
    serving = asyncio.create_task(sidecar.serve())
    watching = asyncio.create_task(sidecar.watch_guest())
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, watching.cancel)
    sidecar.modes = modes.start(config.workspace, loop.add_reader)
    if sidecar.modes is not None:
        loop.call_soon(sidecar.modes.scan, None, True)  # after `serve` listens
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    finally:
        serving.cancel()
        Path(config.listen).unlink(missing_ok=True)
        if sidecar.modes is not None:
            loop.remove_reader(sidecar.modes.fd)
            sidecar.modes.close()
        sidecar.log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmctl.sidecars.guestpath", description=__doc__)
    parser.add_argument("config", type=Path)
    args = parser.parse_args(argv)
    config = SidecarConfig(**json.loads(args.config.read_text()))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
