"""The port mirror: a guest's listening TCP ports, live on the host's 127.0.0.1.

One small process per guest with a network (started by `vm.boot.up`,
in its own session, so it serves detached guests too):
`python -m vmctl.sidecars.mirror --root INSTANCE_DIR --name NAME --events FILE`.
The guest's watcher (data/guest/vmctl-ports-watch.sh) writes
`ports P1 P2 ...` lines to a virtio-serial port whose host end is
`ports.sock`; this process reads them and adds or removes user-mode
forwards through the `hostfwd_add`/`hostfwd_remove` monitor commands on
its own QMP socket (`mirror-qmp.sock`), so `vmctl status` and `down` never
wait for it. Forwards bind 127.0.0.1 only. A host port that is taken is
skipped, with the reason in an event and in `forwards.json`, and retried
now and then. It exits when QEMU closes the port (the guest stopped).

What it can spend is bounded: one process, at most `max_ports` forwards
(the contract's `mirror` section), report lines of at most 1 KiB. Only the
foundations are imported (sidecars never import `vm`): its QMP is
vmctl.sidecars.monitor.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vmctl import contract
from vmctl.events import Event, EventLog, now, subject_file
from vmctl.paths import InstancePaths, events_dir
from vmctl.poll import Timeout, wait_until
from vmctl.procs import ProcessRef, hold, wait_gone
from vmctl.sidecars.monitor import Monitor
from vmctl.state import StateError, read_json, write_json

NETDEV = "n0"
#: Host ports a guest never takes, even while free: vmctl's model gateway port
#: (clients and other guests trust 127.0.0.1 there to be the model; a guest
#: listening there first would pose as it).
RESERVED = frozenset({int(contract.raw()["network"]["model_port"])})  # vmctl serve's default
MAX_LINE = 1024
RETRY_S = 10.0
CONNECT_TIMEOUT_S = 20.0
ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH")


def parse_report(line: bytes, max_ports: int) -> set[int] | None:
    """`ports 80 8000` -> {80, 8000}; None for anything else."""
    words = line.decode("ascii", "replace").split()
    if not words or words[0] != "ports":
        return None
    ports = {int(w) for w in words[1:] if w.isdigit() and 0 < int(w) < 65536}
    return set(sorted(ports)[:max_ports])


def holder(instances: Path, me: str, port: int) -> str | None:
    """Another guest whose mirror holds host port `port`, if any."""
    for other in instances.iterdir() if instances.is_dir() else []:
        if other.name == me:
            continue
        with_state = InstancePaths(other).forwards
        try:
            data = read_json(with_state, {"live": list})
        except StateError:
            continue
        if port in data["live"]:
            return other.name
    return None


class Mirror:
    """The host side of one guest's mirror: desired ports in, forwards out."""

    def __init__(self, ipaths: InstancePaths, name: str, log: EventLog, static: set[int]):
        self.paths = ipaths
        self.name = name
        self.log = log
        self.static = static  # host ports of `-p` forwards
        self.live: dict[int, str] = {}
        self.skipped: dict[int, tuple[str, float]] = {}
        self.mon: Monitor | None = None

    def event(self, action: str, port: int, reason: str | None = None) -> None:
        self.log.write(
            Event(
                kind="forward", who_kind="guest", who=self.name, by="vmctl-mirror",
                action=action, host="127.0.0.1", port=port, reason=reason,
                decision="deny" if action == "skip" else "allow",
            )
        )  # fmt: skip

    def _skip(self, port: int, reason: str) -> None:
        if self.skipped.get(port, ("",))[0] != reason:
            self.event("skip", port, reason)
            print(f"{now()} skip {port}: {reason}", flush=True)
        self.skipped[port] = (reason, time.monotonic())

    def _add(self, port: int) -> None:
        assert self.mon is not None
        if port in self.static:
            return self._skip(port, f"host port {port} is already taken by a -p forward")
        if port in RESERVED:
            return self._skip(
                port, f"host port {port} is vmctl's model gateway port: never mirrored"
            )
        out = self.mon.hmp(f"hostfwd_add {NETDEV} tcp:127.0.0.1:{port}-:{port}").strip()
        if out:
            return self._skip(port, f"{self._why_taken(port)} ({out[:120]})")
        self.skipped.pop(port, None)
        self.live[port] = now()
        self.event("add", port)

    def _why_taken(self, port: int) -> str:
        other = holder(self.paths.root.parent, self.name, port)
        if other:
            return f"host port {port} is already mirrored for guest {other}"
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except PermissionError:
                return f"host port {port} is privileged and vmctl may not bind it"
            except OSError:
                return f"host port {port} is already in use on the host"
        try:  # free to us, but QEMU may run in a user namespace (vm.idmap)
            start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
        except (OSError, ValueError):
            start = 1024
        if port < start:
            return f"host port {port} is privileged (below {start}) and QEMU runs unprivileged"
        return f"QEMU could not bind host port {port}"

    def _remove(self, port: int, reason: str) -> None:
        if self.mon is not None:
            self.mon.hmp(f"hostfwd_remove {NETDEV} tcp:127.0.0.1:{port}")
        del self.live[port]
        self.event("remove", port, reason)

    def apply(self, desired: set[int]) -> None:
        """Bring the forwards to `desired`, retrying skipped ports after RETRY_S."""
        for port in sorted(set(self.live) - desired):
            self._remove(port, "the guest stopped listening")
        for port in list(self.skipped):
            if port not in desired:
                del self.skipped[port]
        for port in sorted(desired - set(self.live)):
            last = self.skipped.get(port)
            if last is None or time.monotonic() - last[1] >= RETRY_S:
                self._add(port)
        self.save()

    def save(self) -> None:
        write_json(
            self.paths.forwards,
            {
                "live": sorted(self.live),
                "since": {str(p): t for p, t in sorted(self.live.items())},
                "skipped": {str(p): r for p, (r, _) in sorted(self.skipped.items())},
                "updated": now(),
            },
        )

    def stop(self) -> None:
        for port in sorted(self.live):
            del self.live[port]
            self.event("remove", port, "the guest stopped")
        self.skipped.clear()
        self.save()


def _connect(path: Path) -> socket.socket:
    def attempt() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(path))
        except OSError:
            s.close()
            raise
        return s

    try:
        return wait_until(attempt, timeout=CONNECT_TIMEOUT_S, what=f"{path.name}")
    except Timeout as e:
        raise ConnectionError(str(e)) from None


def run(ipaths: InstancePaths, name: str, events: Path, static: set[int]) -> None:
    """Serve one guest until QEMU closes its end of the port."""
    cfg = contract.raw()["mirror"]
    with EventLog(events) as log:
        mirror = Mirror(ipaths, name, log, static)
        ports = _connect(ipaths.ports)
        mirror.mon = Monitor(ipaths.mirror_qmp)
        mirror.save()
        buf = b""
        desired: set[int] = set()
        try:
            while True:
                ready, _, _ = select.select([ports], [], [], RETRY_S)
                if not ready:
                    mirror.apply(desired)  # retry skipped ports
                    continue
                chunk = ports.recv(4096)
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\n")
                buf = buf[-MAX_LINE:]
                for line in lines[-1:]:  # each report is the whole set: the last one wins
                    got = parse_report(line[:MAX_LINE], int(cfg["max_ports"]))
                    if got is not None:
                        desired = got
                        mirror.apply(desired)
        except (OSError, ConnectionError, ValueError) as e:
            print(f"{now()} mirror stopped: {e}", flush=True)
        finally:
            mirror.stop()


def start(ipaths: InstancePaths, name: str, static: list[int]) -> ProcessRef:
    """Start the mirror for a running guest, in its own session; it ends when QEMU does."""
    argv = [sys.executable, "-m", "vmctl.sidecars.mirror", "--root", str(ipaths.root)]
    argv += ["--name", name, "--static", ",".join(str(p) for p in static)]
    argv += ["--events", str(subject_file(events_dir(), "guest", name))]
    env = {k: v for k, v in os.environ.items() if k in ENV_KEEP}
    with open(ipaths.mirror_log, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=ipaths.root, env=env, start_new_session=True,
        )  # fmt: skip
    return hold(proc)


def stop(ref: ProcessRef | None) -> None:
    """The mirror leaves by itself once QEMU closes its port; make sure it did."""
    if ref is not None and ref.alive() and not wait_gone(ref, 2.0):
        ref.terminate(timeout=2.0)


def describe(spec: dict[str, Any], ipaths: InstancePaths, running: bool) -> dict[str, Any]:
    """What `vmctl status` says about mirroring: on/off, why, live and skipped ports."""
    out: dict[str, Any] = {"state": "off", "why": "", "live": [], "skipped": {}}
    if spec.get("net") == "none":
        out["why"] = "--net none: the guest has no network device, nothing is mirrored"
    elif not spec.get("mirror"):
        out["why"] = "turned off with --no-mirror"
    elif not running:
        out["why"] = "the guest is not running"
    else:
        out["state"] = "on"
        try:
            data = read_json(ipaths.forwards, {"live": list, "skipped": dict})
        except StateError:
            out["why"] = "no report from the guest yet"
            return out
        out["live"] = [p for p in data["live"] if isinstance(p, int)]
        out["skipped"] = {str(k): str(v) for k, v in data["skipped"].items()}
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse  # here: `vmctl up` imports this module for `start`, not for this

    ap = argparse.ArgumentParser(prog="vmctl.sidecars.mirror")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--events", type=Path, required=True)
    ap.add_argument("--static", default="", help="host ports of -p forwards, comma-separated")
    args = ap.parse_args(argv)
    static = {int(p) for p in args.static.split(",") if p.isdigit()}
    try:
        run(InstancePaths(args.root), args.name, args.events, static)
    except OSError as e:
        print(f"{now()} mirror could not start: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    os.umask(0o077)
    main()
