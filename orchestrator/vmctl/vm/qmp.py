"""A small synchronous QMP client over `qemu.qmp`.

vmctl's callers are synchronous, so this wraps `qemu.qmp.legacy`'s
`QEMUMonitorProtocol` (which drives QMPClient on a private event loop) and
adds what the lifecycle needs: a bounded connect that retries while QEMU
is still creating its socket, a per-command timeout, and errors that say
which instance did not answer.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmctl.errors import VMError
from vmctl.poll import Timeout, wait_until

COMMAND_TIMEOUT_S = 10.0


class QMP:
    """One QMP connection to one QEMU; close() is idempotent."""

    def __init__(self, socket_path: Path, *, what: str = "QEMU"):
        self.path = socket_path
        self.what = what
        self._mon: QEMUMonitorProtocol | None = None

    def connect(self, timeout: float = 10.0) -> QMP:
        """Connect and negotiate, retrying until `timeout` (QEMU may still be starting)."""

        def attempt() -> QEMUMonitorProtocol:
            mon = QEMUMonitorProtocol(str(self.path))
            try:
                mon.connect(negotiate=True)
            except BaseException:
                with contextlib.suppress(Exception):
                    mon.close()
                raise
            return mon

        try:
            self._mon = wait_until(attempt, timeout=timeout, what=f"QMP of {self.what}")
        except Timeout as e:
            raise VMError(f"cannot reach QMP of {self.what}: {e.last}") from e
        self._mon.settimeout(COMMAND_TIMEOUT_S)
        return self

    def cmd(self, name: str, **args: object) -> Any:
        """Run one QMP command; its `return` value, or VMError."""
        if self._mon is None:
            raise VMError(f"QMP of {self.what} is not connected")
        try:
            return self._mon.cmd(name, **args)
        except (QMPError, OSError, TimeoutError) as e:
            raise VMError(f"QMP {name} failed on {self.what}: {e or type(e).__name__}") from e

    def query_status(self) -> dict[str, Any]:
        """{'status': 'running', 'running': True, ...}."""
        result = self.cmd("query-status")
        return result if isinstance(result, dict) else {}

    def cont(self) -> None:
        """Start the CPU of a QEMU started with -S."""
        self.cmd("cont")

    def powerdown(self) -> None:
        """Ask the guest to shut down (ACPI power button)."""
        self.cmd("system_powerdown")

    def quit(self) -> None:
        """Stop QEMU at once; the connection drops as it exits."""
        with contextlib.suppress(VMError):
            self.cmd("quit")

    def close(self) -> None:
        mon, self._mon = self._mon, None
        if mon is not None:
            with contextlib.suppress(Exception):
                mon.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
