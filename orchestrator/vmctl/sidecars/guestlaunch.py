"""Starting a guest's sidecar (vmctl.sidecars.guestpath) and its guestfwd forwarder.

The host side of the sidecar, apart from the sidecar itself so that
`vmctl up` (vmctl.vm.companions) imports neither asyncio nor the proxying
code: its configuration, the forwarder script QEMU runs per connection,
and the spawn that does not wait for the socket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from vmctl import events, paths, procs
from vmctl.logtail import tail_lines
from vmctl.poll import Timeout, wait_until
from vmctl.procs import ProcessRef
from vmctl.sidecars import hold

MAX_CONNS = 32
IDLE_S = 300.0
SLOW_S = 30.0


@dataclass(frozen=True)
class SidecarConfig:
    """One guest's sidecar; written to the instance folder as JSON."""

    name: str
    listen: str  # sidecar.sock
    meta: str  # instance.json: QEMU's and the owner's identity
    target_host: str = ""  # the model endpoint; "" when the guest has none
    target_port: int = 0
    max_conns: int = MAX_CONNS
    idle_s: float = IDLE_S
    slow_s: float = SLOW_S
    workspace: str = ""  # the writable workspace whose x bits cross (vmctl.sidecars.modes)
    disk_floor: int = 0  # bytes; 0: no floor (vmctl.sidecars.floor)
    disk_path: str = ""  # the workspace whose filesystem the floor watches


def write_config(path: Path, config: SidecarConfig) -> None:
    path.write_text(json.dumps(asdict(config)))
    path.chmod(0o600)


FORWARDER = """#!{python} -IS
# vmctl: QEMU's guestfwd starts this per guest connection; it hands the
# connection (its stdin) to the guest's sidecar and exits.
import socket, sys
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect({sock!r})
    socket.send_fds(s, [{dest!r}], [0])
except OSError as e:
    sys.stdout.write({reply!r})
    sys.stdout.flush()
    import json, os, datetime
    t = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    line = json.dumps(dict(kind="connection", who_kind="guest", who={name!r}, by="forwarder",
        action="refuse", decision="deny", reason="sidecar_unreachable", detail=str(e)[:200],
        time=t.replace("+00:00", "Z")), sort_keys=True) + "\\n"
    fd = os.open({events!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, line.encode())
"""


def write_forwarder(script: Path, sock: Path, name: str, dest: str = "model") -> None:
    """The guestfwd `cmd:` program: a comma-free path (it sits inside -netdev)."""
    body = json.dumps({"error": {"message": "vmctl's guest sidecar is not running"}})
    reply = (
        f"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    )
    events_file = events.subject_file(paths.events_dir(), "guest", name)
    script.write_text(
        FORWARDER.format(
            python=sys.executable, sock=str(sock), dest=dest.encode(), reply=reply,
            name=name, events=str(events_file),
        )
    )  # fmt: skip
    script.chmod(0o700)


def unrecorded_qemu(ipaths: paths.InstancePaths) -> list[ProcessRef]:
    """The QEMU of a guest whose `vmctl up` died before recording it, if any."""
    return procs.unrecorded(os.path.realpath(ipaths.root), ipaths.qemu_name)


def spawn(
    ipaths: paths.InstancePaths, config: SidecarConfig, gate: int | None = None
) -> subprocess.Popen[bytes]:
    """Start the sidecar in its own session, not waiting for it (see `listening`).

    With `gate` (a pipe's read end), it listens at once and starts up once
    that closes (vmctl.sidecars.hold).
    """
    write_config(ipaths.sidecar_config, config)
    if config.target_host:
        write_forwarder(ipaths.relay, ipaths.sidecar, config.name)
    ipaths.sidecar.unlink(missing_ok=True)  # `listening` waits for the new one
    argv = hold.argv(gate, config.listen, "vmctl.sidecars.guestpath", [str(ipaths.sidecar_config)])
    with open(ipaths.sidecar_log, "ab") as log:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ipaths.root,
            start_new_session=True, pass_fds=() if gate is None else (gate,),
        )  # fmt: skip


def listening(
    ipaths: paths.InstancePaths, proc: subprocess.Popen[bytes], timeout: float = 15.0
) -> int:
    """The spawned sidecar's pid once its socket listens; OSError if it died or hung."""

    def died() -> str | None:
        return None if proc.poll() is None else f"exited with status {proc.returncode}"

    try:
        wait_until(
            lambda: True if ipaths.sidecar.exists() else None,
            timeout=timeout, what="the guest sidecar", interval=0.02, abort=died,
        )  # fmt: skip
    except Timeout as e:
        proc.kill()
        said = tail_lines(ipaths.sidecar_log, 3) or e.last
        raise OSError(f"the guest sidecar did not start: {said}") from None
    return proc.pid
