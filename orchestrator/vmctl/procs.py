"""Processes vmctl started, identified so that only they are ever signalled.

A pid alone is not an identity: after a crash the number may belong to a
stranger. vmctl records (pid, start time) when it starts a process and
signals it only while both still match.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

#: The Popen objects `hold` keeps for this process's life.
_HELD: list[subprocess.Popen[bytes]] = []


def die_with_parent() -> None:
    """In a child before exec (preexec_fn): SIGKILL it when its parent dies (Linux).

    A foreground guest's QEMU and virtio-fs daemon use it, so a SIGKILLed
    vmctl leaves neither running.
    """
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def boot_id() -> str:
    """This host boot's id (Linux), for probe results that hold until a reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "noboot"


def start_time(pid: int) -> str | None:
    """An opaque token that changes when `pid` is reused; None if gone."""
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return None
        # Field 22 (starttime) counts from after the parenthesised comm.
        fields = stat[stat.rfind(b")") + 2 :].split()
        return fields[19].decode() if len(fields) > 19 else None
    import subprocess  # only off Linux; `vmctl exec` start-up counts

    try:
        out = subprocess.run(
            ["/bin/ps", "-o", "lstart=", "-p", str(pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return None
    return out or None


@dataclass(frozen=True)
class ProcessRef:
    """A process vmctl started: its pid and start-time token."""

    pid: int
    start: str

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        token = start_time(pid)
        return cls(pid, token or "")

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def from_json(cls, data: object) -> ProcessRef:
        if not isinstance(data, dict):
            raise ValueError("process record is not an object")
        pid, start = data.get("pid"), data.get("start")
        if not isinstance(pid, int) or pid <= 1 or not isinstance(start, str):
            raise ValueError("process record has no valid pid/start")
        return cls(pid, start)

    def alive(self) -> bool:
        """True while the very process we started still runs (not a zombie)."""
        token = start_time(self.pid)
        if token is None or token != self.start:
            return False
        if sys.platform.startswith("linux"):
            try:
                with open(f"/proc/{self.pid}/stat", "rb") as f:
                    stat = f.read()
                if stat[stat.rfind(b")") + 2 :].split()[0] == b"Z":
                    return False
            except OSError:
                return False
        return True

    def signal(self, sig: int) -> bool:
        """Send `sig` only if the process is still ours; True if sent."""
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL: the last rung of every shutdown ladder."""
        if not self.signal(signal.SIGTERM):
            return
        if wait_gone(self, timeout):
            return
        self.signal(signal.SIGKILL)
        wait_gone(self, 5.0)


def hold(proc: subprocess.Popen[bytes]) -> ProcessRef:
    """Keep a companion's Popen referenced for this process's life; its identity.

    A Popen dropped while its child runs warns from `__del__`, and a Ctrl-C
    that lands there is swallowed ("Exception ignored"): under load a
    foreground `vmctl up` then waited on its guest for ever instead of
    stopping it. The companions (sidecar, proxy, virtio-fs daemon, mirror)
    run on after their spawn returns, so their Popen objects stay here.
    """
    _HELD.append(proc)
    return ProcessRef.of(proc.pid)


def unrecorded(root: str, name_arg: str) -> list[ProcessRef]:
    """Processes running in folder `root` with `-name NAME_ARG` in their argv (Linux).

    A guest's QEMU is on record once its spawn returns. A `vmctl up`
    SIGKILLed between the fork and that record leaves a QEMU nobody names;
    this finds it by what it was given (its folder as working directory,
    its `-name`), so the watchdog and the reaper can still stop it.
    """
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                if b"-name" not in argv or os.readlink(f"/proc/{entry}/cwd") != root:
                    continue
            except OSError:
                continue  # gone, or not ours to read
            i = argv.index(b"-name")
            if argv[i + 1 : i + 2] == [name_arg.encode()]:
                found.append(ProcessRef.of(int(entry)))
    return found


def wait_gone(ref: ProcessRef, timeout: float) -> bool:
    """Wait until `ref` exits (reaping it if it is our child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(ref.pid, os.WNOHANG)
        if not ref.alive():
            return True
        time.sleep(0.05)
    return not ref.alive()
