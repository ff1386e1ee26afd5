"""server.json: what a running server is, written by its supervisor, read by the rest.

Parsed strictly (a `StateError` on any missing or mistyped field), so that
`vmctl ls`, `stop`, `rm` and the endpoint lookup never guess from a dict.
Liveness is not stored: it is derived from the supervisor's process record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmctl.procs import ProcessRef
from vmctl.state import StateError, read_json, write_json

STATES = ("loading", "ready", "stopped")


def _ref(raw: object, key: str, path: Path) -> ProcessRef:
    try:
        return ProcessRef.from_json(raw)
    except ValueError as e:
        raise StateError(f"{path}: field {key!r}: {e}") from None


@dataclass(frozen=True)
class ServerRecord:
    """One server's state file; `llama` is None until llama-server has started."""

    name: str
    alias: str
    host: str
    port: int
    api_key: str | None
    sandbox: bool
    model: str
    supervisor: ProcessRef
    llama: ProcessRef | None
    started: float
    state: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "alias": self.alias,
            "host": self.host,
            "port": self.port,
            "api_key": self.api_key,
            "sandbox": self.sandbox,
            "model": self.model,
            "supervisor": self.supervisor.to_json(),
            "llama": self.llama.to_json() if self.llama else None,
            "started": self.started,
            "state": self.state,
        }

    def write(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> ServerRecord:
        data = read_json(
            path,
            {
                "name": str, "alias": str, "host": str, "port": int, "sandbox": bool,
                "model": str, "supervisor": dict, "started": (int, float), "state": str,
            },
        )  # fmt: skip
        if data["state"] not in STATES:
            raise StateError(f"{path}: state {data['state']!r} is not one of {STATES}")
        api_key, llama = data.get("api_key"), data.get("llama")
        if api_key is not None and not isinstance(api_key, str):
            raise StateError(f"{path}: field 'api_key' has the wrong type")
        return cls(
            name=data["name"],
            alias=data["alias"],
            host=data["host"],
            port=data["port"],
            api_key=api_key,
            sandbox=data["sandbox"],
            model=data["model"],
            supervisor=_ref(data["supervisor"], "supervisor", path),
            llama=None if llama is None else _ref(llama, "llama", path),
            started=float(data["started"]),
            state=data["state"],
        )
