"""`vmctl run`: one host client, configured, confined and bridged to the model.

`run()` puts the pieces together: the endpoint (`vmctl.endpoint` finds the
model), the workspace, the client's config (`vmctl.clients.registry`), the
sandbox, and on Linux the bridge that carries the endpoint into a sandbox
without network (`vmctl.sidecars.bridge`), plus the egress proxy under
`--policy`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vmctl import agents, egress, events, paths, ui
from vmctl.clients.registry import Client, get, python_runtime
from vmctl.endpoint import Target, find_endpoint
from vmctl.errors import ClientError, ConfigError
from vmctl.sandbox import launch as sandbox
from vmctl.sandbox.resolve import SandboxContext
from vmctl.sidecars import floor
from vmctl.sidecars.bridge import HostRelay
from vmctl.sidecars.proxy_serve import client_proxy

BRIDGE = Path(__file__).resolve().parents[1] / "sidecars" / "bridge.py"


@dataclass
class RunRequest:
    """Everything `vmctl run` was asked, parsed."""

    client: str
    workspace: Path
    args: list[str] = field(default_factory=list)
    endpoint: str | None = None
    server: str | None = None
    api_key: str | None = None
    client_bin: Path | None = None
    sandbox: bool = True
    #: Egress preset (vmctl.egress): the proxy is bridged in; None: the model only.
    policy: str | None = None
    resolve: tuple[str, ...] = ()
    #: `--disk-floor` in bytes (vmctl.sidecars.floor); None: its default, 0: off.
    disk_floor: int | None = None


def run(req: RunRequest) -> int:
    """Configure the client, start it confined, return its exit status."""
    client = get(req.client)
    if req.policy is not None:
        egress.preset(req.policy)
        egress.resolve_map(req.resolve)
    elif req.resolve:
        raise ConfigError("--resolve needs the egress proxy", "pass --policy")
    ws = sandbox.check_workspace(req.workspace)
    watch = _FloorWatch(client.name, ws, floor.resolve(ws, req.disk_floor))
    binary = client.find(req.client_bin)
    target = find_endpoint(req.endpoint, server=req.server, api_key=req.api_key)
    notice = agents.context_notice(target.endpoint(), (client.name,))
    if notice:
        ui.warn(notice)
    state = paths.private_dir(paths.client_paths(client.name).state)
    if req.policy is not None and (not req.sandbox or sys.platform != "linux"):
        raise ConfigError("--policy needs the Linux sandbox", "drop --policy or --no-sandbox")
    if not req.sandbox:
        ui.warn(f"--no-sandbox: {client.name} runs UNCONFINED, with your files and network")
        env = client.configure(target.endpoint(), state)
        cmd = sandbox.unsandboxed_command(client.argv(binary, req.args), env, client.profile)
        return _launch(cmd.argv, cmd.env, ws, watch)
    sandbox.check_available()
    read, exe = client.needs(binary)
    if sys.platform != "linux":
        if target.host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError("on macOS the sandbox reaches only a loopback endpoint")
        env = client.configure(target.endpoint(), state)
        ctx = SandboxContext(
            binary=binary, workspace=ws, state=state, endpoint_port=target.port,
            extra_read=read, extra_exec=exe,
        )  # fmt: skip
        argv = client.argv(binary, req.args)
        cmd = sandbox.sandboxed_command(client.profile, argv, ctx, env=env)
        cmd.write_files()
        return _launch(cmd.argv, cmd.env, cmd.cwd or ws, watch)
    return _run_bridged(client, binary, target, ws, state, req, (read, exe), watch)


def _run_bridged(
    client: Client,
    binary: Path,
    target: Target,
    ws: Path,
    state: Path,
    req: RunRequest,
    needs: tuple[tuple[Path, ...], tuple[Path, ...]],
    watch: _FloorWatch,
) -> int:
    """Linux: relays on UNIX sockets outside, the bridge listening inside.

    Under `--policy` the egress proxy is a second socket, bridged to
    127.0.0.1:PROXY_PORT inside, where HTTP(S)_PROXY point.
    """
    cp = paths.client_paths(client.name)
    runtime = paths.private_dir(cp.runtime(os.getpid()))
    sock = cp.endpoint_socket(os.getpid())
    env = client.configure(target.endpoint(f"http://127.0.0.1:{target.port}"), state)
    py_read, py_exec = python_runtime()
    ctx = SandboxContext(
        binary=binary,
        workspace=ws,
        state=state,
        endpoint_port=target.port,
        endpoint_socket=sock,
        # The runtime folder holds only the sockets; a read-only bind still connects.
        extra_read=(*needs[0], *py_read, BRIDGE, runtime),
        extra_exec=(*needs[1], *py_exec),
    )
    listen = ["--listen", f"127.0.0.1:{target.port}", "--socket", str(sock)]
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, runtime, ignore_errors=True)
        if req.policy is not None:
            px = client_proxy(
                client.name, req.policy, req.resolve, runtime, (target.host, target.port)
            )
            listen += stack.enter_context(px).bridge_args
            env |= px.env
        inner = [str(py_exec[0]), "-I", "-S", str(BRIDGE), *listen, "--"]
        inner += client.argv(binary, req.args)
        stack.enter_context(HostRelay(sock, target.host, target.port, client.name))
        cmd = sandbox.sandboxed_command(client.profile, inner, ctx, env=env)
        return _launch(cmd.argv, cmd.env, cmd.cwd or ws, watch)
    raise AssertionError("unreachable")


@dataclass
class _FloorWatch:
    """The workspace's disk floor for one client run (0: none): paused below it, told."""

    client: str
    workspace: Path
    floor_bytes: int

    def start(self, pid: int) -> floor.ProcessWatch | None:
        if self.floor_bytes <= 0:
            return None
        return floor.ProcessWatch(pid, str(self.workspace), self.floor_bytes, self.said)

    def said(self, kind: str, action: str, **fields: object) -> None:
        events.lifecycle(paths.events_dir(), "client", self.client, "vmctl", action, **fields)
        if action == "pause":
            ui.warn(
                f"{self.client} paused: {fields.get('detail')}; it goes on once "
                f"{floor.human(self.floor_bytes + floor.RESUME_MARGIN)} is free (Ctrl-C stops it)"
            )
        else:
            ui.info(f"{self.client} goes on: {fields.get('detail')}")


def _launch(argv: list[str], env: dict[str, str], cwd: Path, watch: _FloorWatch) -> int:
    """Run to completion under the disk floor; Ctrl-C stops the child and waits."""
    try:
        proc = subprocess.Popen(argv, env=env, cwd=cwd)
    except OSError as e:
        raise ClientError(f"cannot start {argv[0]}: {e.strerror}") from e
    floor_watch = watch.start(proc.pid)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        if floor_watch is not None:
            floor_watch.stop()  # a stopped client cannot act on the SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        if floor_watch is not None:
            floor_watch.stop()
    return 128 - code if code < 0 else code
