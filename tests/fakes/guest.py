"""A fake guest: a stand-in QEMU process, its QMP monitor and its exec agent.

`FakeGuest` writes a real instance folder (instance.json through
`InstanceRecord`, the exec FIFO pair, qmp.sock) the way `vmctl up` does,
with a `sleep` process playing QEMU. The exec agent speaks the guest side
of the framing in docs/guest-contract.md on the FIFOs, as QEMU's `pipe`
chardev would carry it; `answer` decides each command's output and status.
ACPI powerdown ends the stand-in QEMU unless `ignores_powerdown`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fakes.qmp import FakeQMP
from vmctl import paths
from vmctl.procs import ProcessRef
from vmctl.vm.spec import InstanceRecord, InstanceSpec

Answer = Callable[[str], tuple[bytes, int]]


def shell_answer(command: str) -> tuple[bytes, int]:
    """Run the command on the host, as the guest's shell would run it."""
    r = subprocess.run(["/bin/sh", "-c", command], capture_output=True, timeout=30, check=False)
    return r.stdout + r.stderr, r.returncode


class ExecAgent:
    """The guest end of the exec port: `<id> <base64>` in, framed output out."""

    def __init__(self, fifo_in: Path, fifo_out: Path, answer: Answer = shell_answer) -> None:
        for fifo in (fifo_in, fifo_out):
            if not fifo.exists():
                os.mkfifo(fifo, 0o600)
        # O_RDWR on both, as QEMU's pipe chardev holds them: opening never blocks,
        # and a host client that goes away leaves the FIFOs usable.
        self._rfd = os.open(fifo_in, os.O_RDWR)
        self._wfd = os.open(fifo_out, os.O_RDWR)
        self.answer = answer
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _reply(self, line: bytes) -> bytes:
        req_id, _, payload = line.decode(errors="replace").partition(" ")
        try:
            command = base64.b64decode(payload, validate=True).decode()
        except ValueError:
            return f"\x1eVMCTL-BEGIN {req_id}\nbad request\n\x1eVMCTL-END {req_id} 126\n".encode()
        self.requests.append(command)
        out, status = self.answer(command)
        begin = f"\x1eVMCTL-BEGIN {req_id}\n".encode()
        return begin + out + f"\n\x1eVMCTL-END {req_id} {status}\n".encode()

    def _serve(self) -> None:
        buf = b""
        while True:
            try:
                data = os.read(self._rfd, 65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    with contextlib.suppress(OSError):
                        os.write(self._wfd, self._reply(line.strip()))

    def close(self) -> None:
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)


class FakeGuest:
    """A running "guest" called `name` in the current VMCTL_HOME."""

    def __init__(
        self,
        name: str,
        workspace: Path,
        *,
        answer: Answer = shell_answer,
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
        self.agent = ExecAgent(self.paths.exec_in, self.paths.exec_out, answer)

    def power_off(self) -> None:
        self.qemu.terminate()

    def reap(self) -> int | None:
        """The stand-in QEMU's exit status once it has ended (reaping it), else None."""
        return self.qemu.poll()

    def close(self) -> None:
        self.agent.close()
        self.qmp.close()
        if self.qemu.poll() is None:
            self.qemu.kill()
        self.qemu.wait()
