"""One `Instance` owns one QEMU process and everything attached to it.

The state folder (paths.InstancePaths) holds instance.json with the QEMU
process's identity (pid + start time) and, while `vmctl up` still owns
the guest, the owning vmctl's identity. Status is derived from those, never
stored. A guest whose QEMU or owner died is reaped by the next vmctl run;
a non-detached QEMU also dies with its vmctl (PR_SET_PDEATHSIG), so a
SIGKILLed vmctl leaves no guest running.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING

from vmctl import contract, events, paths
from vmctl.errors import NotFoundError, VMError
from vmctl.logtail import tail_lines
from vmctl.procs import ProcessRef, die_with_parent, wait_gone
from vmctl.sidecars import floor, guestlaunch, mirror
from vmctl.state import StateError
from vmctl.vm import companions, console, virtiofs
from vmctl.vm.console import ExecChannel
from vmctl.vm.info import InstanceInfo, info_of
from vmctl.vm.spec import InstanceRecord

if TYPE_CHECKING:  # qemu.qmp brings asyncio (~50 ms): imported when a monitor is needed
    from vmctl.vm.qmp import QMP

POWERDOWN_TIMEOUT_S = 10.0
QUIT_TIMEOUT_S = 5.0
QEMU_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH")


class Instance:
    """One QEMU guest: start, wait for readiness, exec, shut down, clean up."""

    def __init__(self, record: InstanceRecord):
        self.name = record.name
        self.paths = paths.instance(record.name)
        self.record = record
        self.proc: subprocess.Popen[bytes] | None = None
        # console.listen's pair while booting: QEMU's listener, vmctl's connection.
        self._listener: socket.socket | None = None
        self._console: socket.socket | None = None
        self._closed = False

    # ---- lookup ----
    @classmethod
    def load(cls, name: str) -> Instance:
        ipaths = paths.instance(name)
        try:
            record = InstanceRecord.read(ipaths.meta)
        except StateError:
            raise NotFoundError(f"no instance named {name!r}", "see `vmctl ls --all`") from None
        return cls(record)

    @property
    def ephemeral(self) -> bool:
        return self.record.ephemeral

    @property
    def qemu(self) -> ProcessRef | None:
        return self.record.qemu

    def alive(self) -> bool:
        ref = self.qemu
        return bool(ref and ref.alive())

    def info(self) -> InstanceInfo:
        return info_of(self.paths, self.record)

    # ---- start ----
    def listen_console(self) -> int:
        """Bind the console and connect to it (console.listen); the fd for QEMU's argv."""
        self._listener, self._console = console.listen(self.paths.console)
        return self._listener.fileno()

    def start(self, argv: list[str], *, detach: bool) -> None:
        """Start QEMU in its own session, output to qemu.log, and record it.

        QEMU inherits `listen_console`'s listener; vmctl keeps its
        connection for `wait_ready`.
        """
        assert self._listener is not None, "start follows listen_console"
        listener = self._listener
        env = {k: v for k, v in os.environ.items() if k in QEMU_ENV_KEEP}
        with open(self.paths.qemu_log, "ab") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.paths.root,
                    env=env,
                    start_new_session=True,
                    pass_fds=(listener.fileno(),),
                    preexec_fn=None if detach or sys.platform != "linux" else die_with_parent,
                )
            except OSError as e:
                raise VMError(f"cannot start {argv[0]}: {e.strerror}") from e
            finally:
                listener.close()  # QEMU's now
                self._listener = None
        self.record = replace(self.record, qemu=ProcessRef.of(self.proc.pid))
        self.save()

    def save(self) -> None:
        self.record.write(self.paths.meta)

    def _died(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return f"QEMU exited with status {self.proc.returncode}"
        if self.proc is None and not self.alive():
            return "QEMU is not running"
        return None

    def wait_ready(self, timeout: float) -> float:
        """Block until the guest prints its ready marker; seconds waited.

        Then vmctl lets go of the console, for `vmctl console` to attach.
        """
        assert self._console is not None, "wait_ready follows start"
        logs = (
            "the lines above end its console log (ephemeral: nothing is kept)"
            if self.ephemeral
            else f"see {self.paths.console_log} and {self.paths.qemu_log}"
        )
        try:
            return console.expect_ready(
                self._console, contract.ready_marker(), timeout, abort=self._died
            )
        except VMError as e:
            details = tail_lines(self.paths.console_log, 8) or tail_lines(self.paths.qemu_log)
            daemon = self.record.virtiofsd
            if daemon is not None and not daemon.alive():  # what QEMU's socket error hides
                details = f"virtiofsd: {tail_lines(self.paths.virtiofs_log, 3)}\n{details}"
            why = f"guest {self.name} failed to boot: {e.message}"
            raise VMError(why, logs, details=details) from None
        except TimeoutError:
            raise VMError(
                f"guest {self.name} did not become ready within {timeout:.0f} s",
                f"its init never printed the ready marker; {logs}",
                details=tail_lines(self.paths.console_log),
            ) from None
        finally:
            self._console.close()

    def release(self) -> None:
        """Detach: the guest lives on after this vmctl exits, until `vmctl down`."""
        self.record = replace(self.record, owner=None)
        self.save()

    # ---- use ----
    def exec_channel(self) -> ExecChannel:
        return ExecChannel.for_instance(self.paths.root, self.name)

    def qmp(self, timeout: float = 5.0) -> QMP:
        from vmctl.vm.qmp import QMP

        return QMP(self.paths.qmp, what=f"instance {self.name}").connect(timeout)

    # ---- stop ----
    def _wait_exit(self, timeout: float) -> bool:
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        ref = self.qemu
        return ref is None or wait_gone(ref, timeout)

    def shutdown(self, powerdown_timeout: float = POWERDOWN_TIMEOUT_S) -> None:
        """The ladder: ACPI powerdown, then QMP quit, then SIGTERM/SIGKILL."""
        ref = self.qemu
        if ref is None or not ref.alive():
            self._wait_exit(0.5)
            return
        # Paused by the disk floor: continuing it for a powerdown would let it write
        # past the floor (and the guard cannot pause it again while we hold QMP).
        floor_paused = self.paths.paused.exists()
        with contextlib.suppress(VMError), self.qmp(timeout=2.0) as mon:
            if powerdown_timeout > 0 and not floor_paused:
                with contextlib.suppress(VMError):
                    if mon.query_status().get("status") == "paused":  # by someone else
                        mon.cont()  # a paused guest cannot act on the powerdown
                    mon.powerdown()
                if self._wait_exit(powerdown_timeout):
                    return
            mon.quit()
        if self._wait_exit(QUIT_TIMEOUT_S):
            return
        ref.terminate(timeout=5.0)
        self._wait_exit(1.0)

    def event(self, action: str, **fields: object) -> None:
        """One lifecycle step in this guest's event log (`vmctl logs NAME`)."""
        events.lifecycle(paths.events_dir(), "guest", self.name, "vmctl", action, **fields)

    def forget_floor(self) -> None:
        """The disk floor's state is its running guard's: none survives the guest."""
        for stale in (self.paths.paused, self.paths.disk_floor):
            stale.unlink(missing_ok=True)

    def _ended_elsewhere(self) -> bool:
        """Whether another vmctl (`down` from another terminal, a reaper) ended this QEMU
        and said so: the record is gone, or no longer names the QEMU we know."""
        try:
            return InstanceRecord.read(self.paths.meta).qemu != self.qemu
        except StateError:
            return True

    def close(
        self,
        powerdown_timeout: float = POWERDOWN_TIMEOUT_S,
        reason: str = "stopped",
        detail: str | None = None,
    ) -> None:
        """Stop QEMU and, for an ephemeral guest, remove its folder. Idempotent.

        The guest's log says how it ended: `down` with `reason`, or, for a
        QEMU that had already exited, `down` (status 0: the guest powered
        off) or `crash`.
        """
        if self._closed:
            return
        self._closed = True
        gone = self.qemu is not None and not self.alive()  # it went before we stopped it
        for held in (self._listener, self._console):
            if held is not None:
                held.close()
        ran = self.qemu is not None or self.proc is not None
        try:
            self.shutdown(powerdown_timeout)
        finally:
            status = self.proc.poll() if self.proc is not None else None
            if gone and not self._ended_elsewhere():
                said = "QEMU exited" if status is None else f"QEMU exited with status {status}"
                self.event("crash" if status else "down", reason="qemu_exited", detail=said)
            elif not gone and (ran or reason != "stopped"):  # a stopped guest: nothing to say
                self.event("down", reason=reason, detail=detail)
            companions.stop_sidecar(self.record)
            virtiofs.stop(self.record.virtiofsd)
            mirror.stop(self.record.mirror_sidecar)
            companions.stop_proxy(self.record)
            if self.ephemeral or not self.paths.meta.exists():
                shutil.rmtree(self.paths.root, ignore_errors=True)
            else:
                fifos = [
                    f
                    for n in range(len(contract.exec_ports()))
                    for f in self.paths.exec_fifos(n)[:2]
                ]
                socks = (self.paths.qmp, self.paths.console, self.paths.virtiofs_socket)
                for sock in (*socks, *fifos):
                    sock.unlink(missing_ok=True)
                self.forget_floor()
                # Stopped: no QEMU on record, so no reaper takes it for one that died.
                self.record = replace(self.record, qemu=None, owner=None)
                with contextlib.suppress(OSError):
                    self.save()

    def __enter__(self) -> Instance:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(reason="interrupted" if isinstance(exc, KeyboardInterrupt) else "stopped")


def reap_one(ipaths: paths.InstancePaths) -> bool:
    """Clean up one instance whose owner or QEMU died; True if its folder went away."""
    try:
        record = InstanceRecord.read(ipaths.meta)
    except StateError:
        return False
    inst = Instance(record)
    owner = record.owner
    owner_dead = owner is not None and not owner.alive()
    qemu = inst.qemu
    if qemu is None and owner is not None and not owner_dead:
        return False  # booting: its `vmctl up` has not started QEMU yet
    if qemu is not None and qemu.alive():
        if not owner_dead:
            return False
        qemu.terminate(timeout=5.0)
        inst.event("reap", reason="owner_died", detail="vmctl up died; QEMU stopped")
    elif qemu is not None:  # gone without a `vmctl down`: a crash, a poweroff inside
        why = "owner_died" if owner_dead else "qemu_exited"
        inst.event("reap", reason=why, detail="QEMU was gone; cleaned up")
    if qemu is None and owner_dead:  # killed before recording QEMU: find it
        for stray in guestlaunch.unrecorded_qemu(ipaths):
            stray.terminate(timeout=5.0)
            inst.event("reap", reason="owner_died", detail="vmctl up died before QEMU ran")
    companions.stop_sidecar(record)
    virtiofs.stop(record.virtiofsd)
    companions.stop_proxy(record)
    if inst.ephemeral:
        shutil.rmtree(ipaths.root, ignore_errors=True)
        return True
    inst.forget_floor()
    if qemu is not None or owner is not None:  # said once: the record now has neither
        with contextlib.suppress(OSError):
            replace(record, qemu=None, owner=None).write(ipaths.meta)
    return False


def reap() -> list[str]:
    """Reap every dead instance; the names whose folders were removed."""
    gone = []
    for root in sorted(paths.instances_dir().iterdir()):
        if root.is_dir() and reap_one(paths.InstancePaths(root)):
            gone.append(root.name)
    return gone


def list_instances() -> list[InstanceInfo]:
    """Every instance, dead ephemeral ones reaped first; status from pid files."""
    reap()
    found = []
    for root in sorted(paths.instances_dir().iterdir()):
        ipaths = paths.InstancePaths(root)
        with contextlib.suppress(StateError):
            found.append(info_of(ipaths, InstanceRecord.read(ipaths.meta)))
    return found


def status(name: str) -> dict[str, object]:
    """InstanceInfo plus QMP's run state for a running guest."""
    inst = Instance.load(name)
    data = inst.info().to_json()
    data["state"] = "stopped"
    data["notices"] = list(inst.record.notices)
    if inst.alive():
        try:
            with inst.qmp(timeout=2.0) as mon:
                data["state"] = mon.query_status().get("status", "unknown")
        except VMError as e:
            data["state"] = f"unreachable ({e.message})"
    data["mirror"] = mirror.describe(inst.record.to_json()["spec"], inst.paths, inst.alive())
    data["disk_floor"] = floor.describe(inst.paths.disk_floor) if inst.alive() else None
    if isinstance(data["disk_floor"], dict):  # the guard writes it on changes: free is now
        with contextlib.suppress(OSError):
            data["disk_floor"]["free"] = floor.free_bytes(inst.record.workspace)
    return data


def down(name: str, powerdown_timeout: float = POWERDOWN_TIMEOUT_S) -> None:
    """Stop an instance through the shutdown ladder; ephemeral ones vanish."""
    Instance.load(name).close(powerdown_timeout)
