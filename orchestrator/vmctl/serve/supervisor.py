"""The supervisor: one llama-server in its sandbox plus the gateway before it.

Order matters: the gateway binds host:port first (a taken port fails before
any model loads), then llama-server starts in its sandbox on a UNIX socket
in the runtime folder, then `/health` is polled until the model is loaded
(or the server dies, and its last log lines become the error). On Ctrl-C
or SIGTERM everything stops and the runtime folder is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vmctl import events, paths, ui
from vmctl.errors import ServerError, VmctlError
from vmctl.logtail import tail_lines
from vmctl.poll import Timeout, wait_until
from vmctl.procs import ProcessRef
from vmctl.sandbox.launch import SandboxContext, sandboxed_command, unsandboxed_command
from vmctl.serve.gateway import Gateway, GatewayConfig
from vmctl.serve.record import ServerRecord
from vmctl.serve.server import (
    LOAD_TIMEOUT,
    PROFILE,
    ServerConfig,
    cannot_listen,
    check_port_free,
    llama_argv,
    prepare,
)
from vmctl.state import StateError, read_json


def launch_command(config: ServerConfig, sp: paths.ServerPaths) -> tuple[list[str], dict[str, str]]:
    """llama-server's argv and environment, wrapped in its sandbox unless disabled."""
    argv = llama_argv(config, sp.socket)
    env = {"HOME": str(sp.cache), "LLAMA_CACHE": str(sp.cache), "TMPDIR": str(sp.cache)}
    if not config.sandbox:
        cmd = unsandboxed_command(argv, env, PROFILE)
        return cmd.argv, cmd.env
    model = tuple(
        Path(p) for p in [*config.model_parts, *([config.mmproj] if config.mmproj else [])]
    )
    ctx = SandboxContext(
        binary=Path(config.binary),
        cache=sp.cache,
        runtime=sp.runtime,
        model=model,
        gpu=tuple(config.gpu),
    )
    cmd = sandboxed_command(PROFILE, argv, ctx, env=env, profile_dir=sp.sandbox_dir)
    cmd.write_files()
    return cmd.argv, cmd.env


def _record(
    config: ServerConfig, llama: ProcessRef | None, state: str, started: float
) -> ServerRecord:
    return ServerRecord(
        name=config.name, alias=config.alias, host=config.host, port=config.port,
        api_key=config.api_key, sandbox=config.sandbox, model=config.model_path,
        supervisor=ProcessRef.of(os.getpid()), llama=llama, started=started, state=state,
    )  # fmt: skip


def lifecycle(config: ServerConfig, action: str, **fields: object) -> None:
    """One lifecycle event (serve, ready, restart, crash, stop) in the server's file."""
    events.lifecycle(
        paths.events_dir(), "server", config.name, "supervisor", action, server=config.name,
        **fields,
    )  # fmt: skip


BACKOFF_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_RESET_S = 60.0  # a server that ran this long starts its backoff afresh


def _spawn(config: ServerConfig, sp: paths.ServerPaths) -> subprocess.Popen[bytes]:
    argv, env = launch_command(config, sp)
    with open(sp.log, "ab") as log:
        return subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            cwd=sp.runtime, start_new_session=True,
        )  # fmt: skip


async def _exit_or_stop(proc: subprocess.Popen[bytes], stop: asyncio.Event) -> None:
    while not stop.is_set() and proc.poll() is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.25)


class _UnixHTTP(http.client.HTTPConnection):
    """HTTP over llama-server's UNIX socket."""

    def __init__(self, sock: Path) -> None:
        super().__init__("llama", timeout=2)
        self.sock_path = sock

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.sock_path))


def _healthy(sock: Path) -> bool | None:
    """True once llama-server's /health says the model is loaded; None while not."""
    conn = _UnixHTTP(sock)
    try:
        conn.request("GET", "/health")
        status = conn.getresponse().status
    finally:
        conn.close()
    return True if status == 200 else None


def wait_healthy(sock: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Block until the model is loaded; llama-server dying ends the wait at once."""

    def died() -> str | None:
        return None if proc.poll() is None else f"exited with status {proc.returncode}"

    try:
        wait_until(
            lambda: _healthy(sock), timeout=LOAD_TIMEOUT, what="llama-server", interval=0.25,
            abort=died,
        )  # fmt: skip
    except Timeout:
        if proc.poll() is not None:
            raise ServerError(
                f"llama-server exited while loading the model (status {proc.returncode})",
                "check the model file and flags; the server's last log lines are above",
                details=tail_lines(log),
            ) from None
        raise ServerError(
            f"llama-server not healthy after {LOAD_TIMEOUT:.0f} s", details=tail_lines(log)
        ) from None


async def supervise(
    config: ServerConfig,
    sp: paths.ServerPaths,
    on_ready: Callable[[ServerConfig], None] | None = None,
) -> None:
    """Run gateway and llama-server until a signal, then clean up everything."""
    paths.private_dir(sp.runtime)
    paths.private_dir(sp.cache)
    sp.socket.unlink(missing_ok=True)
    gateway = Gateway(
        GatewayConfig(
            config.host, config.port, sp.socket, paths.events_dir(), config.api_key,
            config.alias, name=config.name, routes=sp.routes, max_output=config.max_output,
        )
    )  # fmt: skip
    try:
        await gateway.start()
    except OSError as e:
        raise cannot_listen(config.host, config.port, e) from e
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    llama: ProcessRef | None = None
    proc: subprocess.Popen[bytes] | None = None
    started = time.time()
    sandbox = "sandboxed" if config.sandbox else "NOT sandboxed (--no-sandbox)"
    lifecycle(config, "serve", model=config.alias, detail=f"{config.host}:{config.port}, {sandbox}")
    failed: BaseException | None = None
    try:
        if not config.sandbox:
            ui.warn(
                "running llama-server WITHOUT a sandbox (--no-sandbox): it can reach the network"
            )
        proc = _spawn(config, sp)
        llama = ProcessRef.of(proc.pid)
        _record(config, llama, "loading", started).write(sp.meta)
        with ui.step(f"loading {config.alias}"):
            await asyncio.to_thread(wait_healthy, sp.socket, proc, sp.log)
        _record(config, llama, "ready", started).write(sp.meta)
        lifecycle(config, "ready", model=config.alias, detail=f"{config.host}:{config.port}")
        if on_ready:
            on_ready(config)
        failures = 0
        while True:
            up_since = time.monotonic()
            await _exit_or_stop(proc, stop)
            if stop.is_set():
                break
            assert proc is not None
            status = proc.returncode
            lifecycle(config, "crash", reason="exited", detail=f"llama-server status {status}")
            if config.restart == "no":
                raise ServerError(
                    f"llama-server died (status {status})",
                    "--restart on-failure (the default) restarts it",
                    details=tail_lines(sp.log),
                )
            failures = 1 if time.monotonic() - up_since > HEALTHY_RESET_S else failures + 1
            delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (failures - 1))
            lifecycle(config, "restart", reason="on-failure", detail=f"try {failures} in {delay} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            if stop.is_set():
                break
            sp.socket.unlink(missing_ok=True)
            proc = _spawn(config, sp)
            llama = ProcessRef.of(proc.pid)
            _record(config, llama, "loading", started).write(sp.meta)
            try:
                await asyncio.to_thread(wait_healthy, sp.socket, proc, sp.log)
            except ServerError as e:
                lifecycle(config, "crash", reason="load_failed", detail=e.message)
                continue
            _record(config, llama, "ready", started).write(sp.meta)
            lifecycle(config, "ready", model=config.alias, detail=f"restarted (try {failures})")
    except BaseException as e:
        failed = e
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if llama is not None:
            await asyncio.to_thread(llama.terminate, 10.0)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        await gateway.close()
        shutil.rmtree(sp.runtime, ignore_errors=True)
        if failed is None or isinstance(failed, KeyboardInterrupt | asyncio.CancelledError):
            lifecycle(config, "stop", reason="stopped")
        else:
            why = getattr(failed, "message", None) or type(failed).__name__
            lifecycle(config, "stop", reason="failed", detail=str(why)[:500])
        with contextlib.suppress(OSError):  # last: "stopped" means the audit is written
            _record(config, llama, "stopped", started).write(sp.meta)


def run_foreground(
    config: ServerConfig, on_ready: Callable[[ServerConfig], None] | None = None
) -> None:
    """Supervise in this process until Ctrl-C or SIGTERM."""
    sp = prepare(config)
    check_port_free(config.host, config.port)
    asyncio.run(supervise(config, sp, on_ready))


def main(argv: list[str]) -> int:
    """Entry of a detached supervisor: `python -m vmctl.serve.supervisor CONFIG`."""
    cfg = Path(argv[0])
    try:
        config = ServerConfig.from_json(read_json(cfg, {"name": str}))
        sp = paths.server(config.name)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        asyncio.run(supervise(config, sp))
    except VmctlError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.details:
            print(e.details, file=sys.stderr)
        return 1
    except (StateError, TypeError) as e:
        print(f"error: bad server config {cfg}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
