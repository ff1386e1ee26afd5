"""A fake QEMU monitor: QMP on a UNIX socket, as `-qmp unix:PATH,server` offers it.

It greets, negotiates capabilities, answers `query-status` (`stop` and
`cont` set it), and hands `system_powerdown` and `quit` to callbacks so a
test decides what the "guest" does (power off at once, ignore the button,
...). Every command received is recorded in `commands`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"},
        "capabilities": ["oob"],
    }
}


class FakeQMP:
    """Serve QMP on `path` from a thread until `close()`."""

    def __init__(
        self,
        path: Path,
        *,
        on_powerdown: Callable[[], None] | None = None,
        on_quit: Callable[[], None] | None = None,
        status: str = "running",
    ) -> None:
        self.path = path
        self.on_powerdown = on_powerdown
        self.on_quit = on_quit
        self.status = status
        self.commands: list[str] = []
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(path))
        self._server.listen(4)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _answer(self, name: str) -> dict[str, Any]:
        if name == "query-status":
            return {"return": {"status": self.status, "running": self.status == "running"}}
        if name in ("stop", "cont"):
            self.status = "paused" if name == "stop" else "running"
            return {"return": {}}
        if name == "qmp_capabilities":
            return {"return": {}}
        if name == "system_powerdown":
            if self.on_powerdown:
                self.on_powerdown()
            return {"return": {}}
        if name == "quit":
            if self.on_quit:
                self.on_quit()
            return {"return": {}}
        return {"error": {"class": "CommandNotFound", "desc": f"The command {name} not found"}}

    def _session(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
            buf = ""
            decoder = json.JSONDecoder()
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data.decode()
                # QMP is a stream of JSON values, not lines (qemu.qmp sends no newline).
                while buf.strip():
                    try:
                        request, end = decoder.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    conn.sendall(self._handle(request))

    def _handle(self, request: Any) -> bytes:
        if not isinstance(request, dict):
            return b""
        name = str(request.get("execute", ""))
        self.commands.append(name)
        reply = self._answer(name)
        if "id" in request:
            reply["id"] = request["id"]
        return json.dumps(reply).encode() + b"\r\n"

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._server.close()
        self.path.unlink(missing_ok=True)
