"""A fake guest: a stand-in QEMU process and its QMP monitor.

`FakeGuest` writes a real instance folder (instance.json through
`InstanceRecord`, qmp.sock) the way `vmctl up` does, with a `sleep`
process playing QEMU. ACPI powerdown ends the stand-in QEMU unless
`ignores_powerdown`. (The exec session protocol has its own tests against
the real guest mux on a pty: tests/test_exec*.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fakes.qmp import FakeQMP
from vmctl import paths
from vmctl.procs import ProcessRef
from vmctl.vm.spec import InstanceRecord, InstanceSpec


class FakeGuest:
    """A running "guest" called `name` in the current VMCTL_HOME."""

    def __init__(
        self,
        name: str,
        workspace: Path,
        *,
        ignores_powerdown: bool = False,
        ephemeral: bool = False,
        detached: bool = True,
    ) -> None:
        self.name = name
        self.paths = paths.instance(name)
        paths.private_dir(self.paths.root)
        self.qemu = subprocess.Popen(["sleep", "300"])
        spec = InstanceSpec(name=name, workspace=workspace, ephemeral=ephemeral)
        record = InstanceRecord.of(spec, "micro", time.time(), ProcessRef.of(os.getpid()))
        record = InstanceRecord(
            **{
                **record.__dict__,
                "owner": None if detached else record.owner,
                "qemu": ProcessRef.of(self.qemu.pid),
            }
        )
        record.write(self.paths.meta)
        self.qmp = FakeQMP(
            self.paths.qmp,
            on_powerdown=None if ignores_powerdown else self.power_off,
            on_quit=self.power_off,
        )

    def power_off(self) -> None:
        self.qemu.terminate()

    def reap(self) -> int | None:
        """The stand-in QEMU's exit status once it has ended (reaping it), else None."""
        return self.qemu.poll()

    def close(self) -> None:
        self.qmp.close()
        if self.qemu.poll() is None:
            self.qemu.kill()
        self.qemu.wait()


def stand_in_qemu(ipaths: paths.InstancePaths, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """A process where a guest's QEMU runs, as an unrecorded QEMU is found:
    in the instance folder (or `cwd`), with the guest's `-name`."""
    sleeper = "import time; time.sleep(60)"
    return subprocess.Popen(
        [sys.executable, "-c", sleeper, "-name", ipaths.qemu_name], cwd=cwd or ipaths.root
    )
