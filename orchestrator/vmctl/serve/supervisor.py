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
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from vmctl import events, paths, ui
from vmctl.errors import ServerError
from vmctl.procs import ProcessRef
from vmctl.serve.gateway import Gateway, GatewayConfig
from vmctl.serve.server import LOAD_TIMEOUT, PROFILE, ServerConfig, llama_argv, log_tail
from vmctl.state import write_json


def launch_command(config: ServerConfig, sp: paths.ServerPaths) -> tuple[list[str], dict[str, str]]:
    """llama-server's argv and environment, wrapped in its sandbox unless disabled."""
    argv = llama_argv(config, sp.socket)
    env = {"HOME": str(sp.cache), "LLAMA_CACHE": str(sp.cache), "TMPDIR": str(sp.cache)}
    from vmctl.sandbox import launch as sandbox

    if not config.sandbox:
        cmd = sandbox.unsandboxed_command(argv, env, PROFILE)
        return cmd.argv, cmd.env
    model = tuple(
        Path(p) for p in [*config.model_parts, *([config.mmproj] if config.mmproj else [])]
    )
    ctx = sandbox.SandboxContext(
        binary=Path(config.binary),
        cache=sp.cache,
        runtime=sp.runtime,
        model=model,
        gpu=tuple(config.gpu),
    )
    cmd = sandbox.sandboxed_command(PROFILE, argv, ctx, env=env, profile_dir=sp.sandbox_dir)
    cmd.write_files()
    return cmd.argv, cmd.env


def _meta(
    config: ServerConfig, llama: ProcessRef | None, state: str, started: float
) -> dict[str, object]:
    return {
        "name": config.name,
        "url": f"http://{config.host}:{config.port}",
        "alias": config.alias,
        "host": config.host,
        "port": config.port,
        "api_key": config.api_key,
        "sandbox": config.sandbox,
        "model": config.model_path,
        "supervisor": ProcessRef.of(os.getpid()).to_json(),
        "llama": llama.to_json() if llama else None,
        "started": started,
        "state": state,
    }


def lifecycle(config: ServerConfig, action: str, **fields: object) -> None:
    """One lifecycle event (serve, ready, restart, crash, stop) in the server's file."""
    path = events.subject_file(paths.events_dir(), "server", config.name)
    with contextlib.suppress(OSError), events.EventLog(path) as log:
        log.write(
            events.Event(
                "lifecycle", "server", config.name, "supervisor", action,
                server=config.name, **fields,  # type: ignore[arg-type]
            )
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


async def _healthy(session: aiohttp.ClientSession) -> bool:
    try:
        async with session.get("http://llama/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


async def _wait_healthy(gateway: Gateway, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + LOAD_TIMEOUT
    while not await _healthy(gateway.session()):
        if proc.poll() is not None:
            raise ServerError(
                f"llama-server exited while loading the model (status {proc.returncode})",
                "check the model file and flags; the server's last log lines are above",
                details=log_tail(log),
            )
        if time.monotonic() > deadline:
            raise ServerError(
                f"llama-server not healthy after {LOAD_TIMEOUT:.0f} s", details=log_tail(log)
            )
        await asyncio.sleep(0.25)


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
            config.alias, name=config.name, routes=sp.routes,
        )
    )  # fmt: skip
    try:
        await gateway.start()
    except OSError as e:
        raise ServerError(
            f"cannot listen on {config.host}:{config.port}: {e.strerror}",
            "choose another port with --port, or stop what uses it (vmctl ls; vmctl stop NAME)",
        ) from e
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    llama: ProcessRef | None = None
    proc: subprocess.Popen[bytes] | None = None
    started = time.time()
    try:
        if not config.sandbox:
            ui.warn(
                "running llama-server WITHOUT a sandbox (--no-sandbox): it can reach the network"
            )
        proc = _spawn(config, sp)
        llama = ProcessRef.of(proc.pid)
        write_json(sp.meta, _meta(config, llama, "loading", started))
        with ui.step(f"loading {config.alias}"):
            await _wait_healthy(gateway, proc, sp.log)
        write_json(sp.meta, _meta(config, llama, "ready", started))
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
                    details=log_tail(sp.log),
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
            write_json(sp.meta, _meta(config, llama, "loading", started))
            try:
                await _wait_healthy(gateway, proc, sp.log)
            except ServerError as e:
                lifecycle(config, "crash", reason="load_failed", detail=e.message)
                continue
            write_json(sp.meta, _meta(config, llama, "ready", started))
            lifecycle(config, "ready", model=config.alias, detail=f"restarted (try {failures})")
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
        with contextlib.suppress(OSError):
            write_json(sp.meta, _meta(config, llama, "stopped", started))
