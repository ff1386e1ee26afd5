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

from vmctl import paths, ui
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
        GatewayConfig(config.host, config.port, sp.socket, sp.audit, config.api_key, config.alias)
    )
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
        argv, env = launch_command(config, sp)
        if not config.sandbox:
            ui.warn(
                "running llama-server WITHOUT a sandbox (--no-sandbox): it can reach the network"
            )
        with open(sp.log, "ab") as log:
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=sp.runtime, start_new_session=True,
            )  # fmt: skip
        llama = ProcessRef.of(proc.pid)
        write_json(sp.meta, _meta(config, llama, "loading", started))
        with ui.step(f"loading {config.alias}"):
            await _wait_healthy(gateway, proc, sp.log)
        write_json(sp.meta, _meta(config, llama, "ready", started))
        if on_ready:
            on_ready(config)
        while not stop.is_set() and proc.poll() is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
        if proc.poll() is not None and not stop.is_set():
            raise ServerError(
                f"llama-server died (status {proc.returncode})", details=log_tail(sp.log)
            )
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
