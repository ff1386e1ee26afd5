"""Policy -> SBPL profile text plus the `sandbox-exec` argv (macOS).

The profile starts `(version 1)` `(deny default)` and holds only explicit
allows, then the narrowing denies (`process-fork`, a SIGKILL on any
outbound attempt). Every path travels as a `-D Pn=value` parameter and is
referenced as `(param "Pn")`, so no path, however hostile, can change the
profile's structure. Outbound network is only ever `(remote tcp
"localhost:PORT")` (the address itself a parameter) or a UNIX socket path;
never `(local ip ...)`, which would match every socket's local end and
allow all egress. This renders anywhere; only macOS can run it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jinja2

from vmctl.errors import SandboxError
from vmctl.sandbox.resolve import Resolved
from vmctl.sandbox.workspace import check_path_text

SANDBOX_EXEC = "/usr/bin/sandbox-exec"  # by absolute path: a fake on PATH never runs
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@cache
def _env() -> jinja2.Environment:
    """The SBPL templates' environment, made when first rendered (jinja2 costs
    ~25 ms to import, on every `vmctl up` that never renders a profile)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("vmctl", "templates"),
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


@dataclass(frozen=True)
class SeatbeltProfile:
    """Rendered SBPL text and the parameter values it references."""

    text: str
    params: dict[str, str]

    def argv(self, profile_file: Path, cmd: list[str]) -> list[str]:
        """`sandbox-exec -f FILE -D P0=... -- CMD...`."""
        out = [SANDBOX_EXEC, "-f", str(profile_file)]
        for name, value in self.params.items():
            out += ["-D", f"{name}={value}"]
        return [*out, "--", *cmd]


class _Params:
    """Hands out P0, P1, ... for values; equal values share a name."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self._names: dict[str, str] = {}

    def __call__(self, value: str | Path) -> str:
        text = check_path_text(str(value), "sandbox parameter")
        if text not in self._names:
            name = f"P{len(self._names)}"
            self._names[text] = name
            self.values[name] = text
        return self._names[text]


def _names(values: tuple[str, ...]) -> list[str]:
    for v in values:
        if not SAFE_NAME.match(v):
            raise SandboxError(f"unsafe name {v!r} in a darwin profile")
    return list(values)


def render(res: Resolved) -> SeatbeltProfile:
    """Render a resolved policy (for platform darwin) to SBPL."""
    p = _Params()
    d = res.darwin
    exec_rules = [(p(e), "subpath" if e.is_dir() else "literal") for e in res.exec]
    metadata = [p(m) for m in (*d.metadata, *(str(link.path) for link in res.links))]
    net = res.policy.network
    port = f"localhost:{res.endpoint_port}" if res.endpoint_port else None
    sock = res.endpoint_socket
    context = {
        "name": res.policy.name,
        "read": list(dict.fromkeys(p(x) for x in (*res.read, *res.exec))),
        "write": [p(x) for x in res.write],
        "metadata": list(dict.fromkeys(metadata)),
        "exec": exec_rules,
        "map_executable": [p(x) for x in d.map_executable],
        "extensions": [p(x) for x in d.extensions],
        "fork": res.policy.fork,
        "sysctl": [
            ("sysctl-name-prefix" if s.endswith(".") else "sysctl-name", s)
            for s in _names(d.sysctl)
        ],
        "iokit": _names(d.iokit),
        "mach_lookup": _names(d.mach_lookup),
        "xpc_services": _names(d.xpc_services),
        "bind_socket": p(sock) if net == "bind" and sock else None,
        "bind_tcp": p(port) if net == "bind" and port else None,
        "connect_socket": p(sock) if net == "connect" and sock else None,
        "connect_tcp": p(port) if net == "connect" and port else None,
        "kill_on_outbound": res.policy.kill_on_outbound,
    }
    text = _env().get_template("profile.sb.j2").render(**context)
    return SeatbeltProfile(text=text, params=dict(p.values))
