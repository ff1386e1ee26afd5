"""The workspace's disk floor: an agent that would fill the host's disk is paused.

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

`vmctl run` keeps the same floor for a host client, which writes the folder
itself: its process tree is stopped (SIGSTOP) and continued (SIGCONT), and
the user is told on the terminal.

The floor: `--disk-floor SIZE` (`vmctl up`, `vmctl run`) or
`VMCTL_DISK_FLOOR`; by default 5% of the filesystem, at most 1 GiB; `0`
turns it off. Neither starts on a filesystem already below its floor.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vmctl.errors import ConfigError
from vmctl.sidecars.monitor import Monitor
from vmctl.state import StateError, read_json, write_json

DEFAULT_CAP = 1 << 30
DEFAULT_SHARE = 0.05
RESUME_MARGIN = 64 << 20
TICK_S = 0.5
ENV = "VMCTL_DISK_FLOOR"
_SIZE_RE = re.compile(r"^([0-9]+)([KMGT]?)(i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, option: str = "--disk-floor") -> int:
    """'1G', '500M', '0', '1073741824' -> bytes (binary units); ConfigError otherwise."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ConfigError(f"{option} {text!r} is not a size", "e.g. 1G, 500M, or 0 to turn it off")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def help_text(what: str) -> str:
    """The `--disk-floor` help of `vmctl up` and `vmctl run`, from the defaults here."""
    return (
        f"Pause {what} while the folder's disk has less free "
        f"(default {DEFAULT_SHARE:.0%}, at most {human(DEFAULT_CAP)}; 0: off)."
    )


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


Switch = Callable[[], bool]  # pause or resume; False: not now, try at the next tick


class Guard:
    """Pause below the floor, resume above it plus the margin; called once per tick.

    What pausing means is the caller's: QMP `stop`/`cont` for a guest
    (`qmp_switches`), SIGSTOP/SIGCONT of the process tree for a host client
    (`process_switches`).
    """

    def __init__(
        self,
        workspace: str,
        floor: int,
        switches: tuple[Switch, Switch],
        event: Callable[..., None],
        *,
        state: Path | None = None,
        free: Callable[[str], int] = free_bytes,
        marker: Path | None = None,
    ) -> None:
        self.workspace, self.floor, self.state = workspace, floor, state
        self.pause, self.resume = switches
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
        if not self.paused and free < self.floor and self._switch(self.pause):
            self.paused = True
            self._said("pause", free)
        elif self.paused and free >= self.floor + RESUME_MARGIN and self._switch(self.resume):
            self.paused = False
            self._said("resume", free)

    @staticmethod
    def _switch(switch: Switch) -> bool:
        """A switch that fails is "not now": the guard must never take its sidecar down."""
        try:
            return switch()
        except Exception:
            return False

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
        if self.state is None:
            return
        state = {"floor": self.floor, "free": free, "paused": self.paused, "since": time.time()}
        with contextlib.suppress(OSError):  # the folder of a guest going away
            write_json(self.state, state)


def qmp_switches(qmp: Path) -> tuple[Switch, Switch]:
    """A guest's pause and resume: QMP `stop` and `cont` on a short connection."""

    def command(name: str) -> bool:
        try:
            with Monitor(qmp) as mon:
                mon.execute(name)
        except (OSError, ValueError):  # ConnectionError, a timeout, a garbled reply
            return False
        return True

    return (lambda: command("stop")), (lambda: command("cont"))


def _parents() -> list[tuple[int, int]]:
    """(pid, parent pid) of every process: /proc on Linux (no `ps` needed), else `ps`."""
    if not os.path.isdir("/proc/self"):
        out = subprocess.run(
            ["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=False
        ).stdout
        pairs = [line.split() for line in out.splitlines()]
        return [(int(a), int(b)) for a, b, *_ in pairs if a.isdigit() and b.isdigit()]
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with (
                contextlib.suppress(OSError, ValueError, IndexError),  # gone meanwhile
                open(f"/proc/{entry}/stat", "rb") as f,
            ):
                found.append((int(entry), int(f.read().rsplit(b")", 1)[1].split()[1])))
    return found


def process_tree(root: int) -> list[int]:
    """`root` and every process below it."""
    kids: dict[int, list[int]] = {}
    for pid, parent in _parents():
        kids.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += kids.get(pid, [])
    return found


def process_switches(root: int) -> tuple[Switch, Switch]:
    """A host client's pause and resume: SIGSTOP and SIGCONT to its whole process tree.

    Pausing scans again until no new process appears (one forked between a
    scan and its signal is caught by the next), at most three times.
    """

    def signal_tree(sig: int, passes: int) -> bool:
        done: set[int] = set()
        for _ in range(passes):
            try:
                new = [p for p in process_tree(root) if p not in done]
            except OSError:  # no `ps` (not Linux): not now
                return bool(done)
            if not new:
                break
            for pid in new:
                with contextlib.suppress(OSError):  # gone meanwhile
                    os.kill(pid, sig)
            done.update(new)
        return True

    return (lambda: signal_tree(signal.SIGSTOP, 3)), (lambda: signal_tree(signal.SIGCONT, 1))


class ProcessWatch:
    """A host client's floor: a thread ticks a `Guard` over its process tree until `stop`."""

    def __init__(self, pid: int, workspace: str, floor: int, event: Callable[..., None]):
        self.guard = Guard(workspace, floor, process_switches(pid), event)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-floor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(TICK_S):
            self.guard.tick()

    def stop(self) -> None:
        """No more ticks; a client left paused is continued (it must act on a SIGTERM)."""
        self._done.set()
        self._thread.join(5)
        if self.guard.paused:
            self.guard.resume()
            self.guard.paused = False


def describe(state: Path) -> dict[str, object] | None:
    """disk-floor.json for `vmctl status`; None without a floor (or before it started)."""
    try:
        data = read_json(state, {"floor": int, "free": int, "paused": bool})
    except StateError:
        return None
    return {"floor": data["floor"], "free": data["free"], "paused": data["paused"]}
