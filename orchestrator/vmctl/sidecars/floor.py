"""The workspace's disk floor: a guest that would fill the host's disk is paused.

The workspace is the user's folder and the agent's writes there are its
work, so vmctl does not cap them (Lima and Docker do not cap bind mounts
either). But an agent that writes without end (a runaway log, a build
cache, `dd`) would fill the filesystem the folder is on, and every other
program on the host would fail with it. So the guest's sidecar (the guest's
watchdog) reads the free space of that filesystem (statvfs's `f_bavail`,
what an unprivileged writer may still use) every half second. Below the
floor it pauses the guest through QMP `stop`, as QEMU's own `werror=stop`
pauses a guest whose disk is full: nothing is lost, the guest's processes
just stop. Once the space is back (the floor plus `RESUME_MARGIN`, so a
guest at the edge does not flap) it continues the guest (`cont`). Both are
audited (`lifecycle` events `pause`/`resume`, reason `disk_floor`) and
shown by `vmctl status` (disk-floor.json). Only a pause of its own is ever
continued.

The floor: `vmctl up --disk-floor SIZE` or `VMCTL_DISK_FLOOR`; by default
5% of the filesystem, at most 1 GiB; `0` turns it off. `vmctl up` refuses
to start a guest on a filesystem already below its floor.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from vmctl.errors import ConfigError
from vmctl.sidecars.monitor import Monitor
from vmctl.state import StateError, read_json, write_json

DEFAULT_CAP = 1 << 30
DEFAULT_SHARE = 0.05
RESUME_MARGIN = 64 << 20
ENV = "VMCTL_DISK_FLOOR"
_SIZE_RE = re.compile(r"^([0-9]+)([KMGT]?)(i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, option: str = "--disk-floor") -> int:
    """'1G', '500M', '0', '1073741824' -> bytes (binary units); ConfigError otherwise."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ConfigError(f"{option} {text!r} is not a size", "e.g. 1G, 500M, or 0 to turn it off")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def human(n: int) -> str:
    """Bytes as the largest binary unit that keeps one decimal: 1.5 GiB."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def free_bytes(path: str | Path) -> int:
    """What an unprivileged writer may still write on `path`'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def default_floor(path: str | Path) -> int:
    """5% of the filesystem, at most 1 GiB."""
    st = os.statvfs(path)
    return min(DEFAULT_CAP, int(st.f_blocks * st.f_frsize * DEFAULT_SHARE))


def resolve(path: Path, requested: int | None) -> int:
    """The floor for a guest whose workspace is `path`; ConfigError if it is already under."""
    floor = default_floor(path) if requested is None else requested
    if floor <= 0:
        return 0
    free = free_bytes(path)
    if free < floor:
        raise ConfigError(
            f"{path}'s filesystem has {human(free)} free, under the disk floor of "
            f"{human(floor)} (below it vmctl pauses the guest)",
            "free some space, or pass a lower --disk-floor (0 turns it off)",
        )
    return floor


class Guard:
    """Pause below the floor, continue above it plus the margin; called once per tick."""

    def __init__(
        self,
        workspace: str,
        floor: int,
        qmp: Path,
        state: Path,
        event: Callable[..., None],
        free: Callable[[str], int] = free_bytes,
        marker: Path | None = None,
    ) -> None:
        self.workspace, self.floor, self.qmp, self.state = workspace, floor, qmp, state
        self.event = event
        self.free = free
        #: Present while paused, for `vmctl exec` to say so (InstancePaths.paused).
        self.marker = marker
        if marker is not None:
            marker.unlink(missing_ok=True)  # a persistent guest stopped while paused
        self.paused = False  # by this guard: a pause of anyone else's is never continued
        self._shown = False

    def tick(self) -> None:
        """Check once; any failure (no space reading, QMP busy) waits for the next tick."""
        try:
            free = self.free(self.workspace)
        except OSError:
            return
        if not self._shown:  # for `vmctl status` from the start
            self._shown = True
            self._show(free)
        if not self.paused and free < self.floor and self._qmp("stop"):
            self.paused = True
            self._said("pause", free)
        elif self.paused and free >= self.floor + RESUME_MARGIN and self._qmp("cont"):
            self.paused = False
            self._said("resume", free)

    def _qmp(self, command: str) -> bool:
        try:
            with Monitor(self.qmp) as mon:
                mon.execute(command)
        except (OSError, ValueError):  # ConnectionError, a timeout, a garbled reply
            return False
        return True

    def _said(self, action: str, free: int) -> None:
        if self.marker is not None:
            with contextlib.suppress(OSError):
                if self.paused:
                    self.marker.touch()
                else:
                    self.marker.unlink(missing_ok=True)
        detail = f"{human(free)} free on the workspace's filesystem, floor {human(self.floor)}"
        self.event("lifecycle", action, reason="disk_floor", detail=detail)
        self._show(free)

    def _show(self, free: int) -> None:
        state = {"floor": self.floor, "free": free, "paused": self.paused, "since": time.time()}
        with contextlib.suppress(OSError):  # the folder of a guest going away
            write_json(self.state, state)


def describe(state: Path) -> dict[str, object] | None:
    """disk-floor.json for `vmctl status`; None without a floor (or before it started)."""
    try:
        data = read_json(state, {"floor": int, "free": int, "paused": bool})
    except StateError:
        return None
    return {"floor": data["floor"], "free": data["free"], "paused": data["paused"]}
