"""The minimum of QMP for the sidecars: a dozen lines of JSON over the socket.

Sidecars never import vmctl.vm (and so not qemu.qmp and asyncio's start-up
cost for the mirror): this blocking client negotiates capabilities and runs
one command at a time, with every read bounded by `timeout`. A guest's
sidecar connects only for a moment (the disk floor's `stop`/`cont`); the
port mirror keeps its own monitor socket.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

QMP_TIMEOUT_S = 5.0


class Monitor:
    """Negotiate, then run commands; events in between are skipped."""

    def __init__(self, path: Path, timeout: float = QMP_TIMEOUT_S) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
            self.buf = b""
            self._reply()  # greeting
            self._send({"execute": "qmp_capabilities"})
            self._reply()
        except BaseException:
            self.sock.close()
            raise

    def _send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def _reply(self) -> dict[str, Any]:
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("QMP closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(line)
            if isinstance(msg, dict) and "event" not in msg:
                return msg

    def execute(self, command: str, **arguments: object) -> Any:
        """A QMP command's `return`; ConnectionError with QEMU's words on an error."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._send(msg)
        reply = self._reply()
        if "error" in reply:
            raise ConnectionError(str(reply["error"].get("desc", "error")))
        return reply.get("return")

    def hmp(self, command: str) -> str:
        """The monitor's text output ("" on success for hostfwd_*)."""
        try:
            return str(self.execute("human-monitor-command", **{"command-line": command}))
        except ConnectionError as e:
            return str(e)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
