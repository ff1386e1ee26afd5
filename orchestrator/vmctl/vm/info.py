"""An instance as `vmctl ls` and `vmctl status` show it.

Derived from the instance's record (instance.json) and its process
identities, never stored: a QEMU that died reads as stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmctl import events, paths
from vmctl.vm.spec import InstanceRecord


@dataclass(frozen=True)
class InstanceInfo:
    """An instance as seen from its state folder (what `vmctl ls` shows)."""

    name: str
    running: bool
    state: str
    pid: int
    started: float
    ephemeral: bool
    detached: bool
    net: str
    policy: str | None  # the egress preset of its proxy (vmctl.egress); None: no proxy
    model_endpoint: str | None
    forwards: list[str]
    workspace: str
    share: str  # the workspace's transport: 9p or virtiofs
    image: str
    root: Path
    console_log: Path
    audit: Path
    qemu_log: Path

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        for key in ("root", "console_log", "audit", "qemu_log"):
            data[key] = str(data[key])
        data["uptime_s"] = round(time.time() - self.started, 1) if self.running else None
        return data


def info_of(ipaths: paths.InstancePaths, rec: InstanceRecord) -> InstanceInfo:
    """What `vmctl ls` and `status` show of an instance, from its record alone."""
    running = bool(rec.qemu and rec.qemu.alive())
    return InstanceInfo(
        name=rec.name,
        running=running,
        state="running" if running else "stopped",
        pid=rec.qemu.pid if rec.qemu else 0,
        started=rec.started,
        ephemeral=rec.ephemeral,
        detached=rec.owner is None,
        net=rec.net,
        policy=rec.policy,
        model_endpoint=rec.model_endpoint,
        forwards=[f"{h}:{g}" for h, g in rec.forwards],
        workspace=rec.workspace,
        share=rec.share,
        image=rec.image,
        root=ipaths.root,
        console_log=ipaths.console_log,
        audit=events.subject_file(paths.events_dir(), "guest", rec.name),
        qemu_log=ipaths.qemu_log,
    )
