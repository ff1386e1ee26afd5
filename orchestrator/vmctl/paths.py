"""Every file of vmctl's state folder, named once.

The layout (below `home()`, default platformdirs' user state folder,
overridable with VMCTL_HOME)::

    servers/NAME/      server.json, audit.jsonl, server.log, run/ (socket, cache)
    instances/NAME/    instance.json, qmp.sock, console.sock, exec.{in,out}, console.log,
                       audit.jsonl, overlay.qcow2, fwcfg/
    clients/NAME/      a host client's private config and data
    events/            one event log per subject (guest-NAME.jsonl, server-NAME.jsonl,
                       client-NAME.jsonl); outlives its subject until `vmctl rm`

and, below `cache_home()` (platformdirs' user cache folder, VMCTL_CACHE)::

    images/            built guest images, by content key

Folders are created 0700. UNIX socket paths are checked against the
108-byte `sun_path` limit here, so callers never meet a truncated bind.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from vmctl.errors import ConfigError

SUN_PATH_MAX = 107  # 108 bytes including the terminating NUL
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,39}$")


def home() -> Path:
    """vmctl's state root, created 0700."""
    env = os.environ.get("VMCTL_HOME")
    if env:
        root = Path(env)
    else:
        import platformdirs  # lazily: `vmctl exec` start-up counts

        root = Path(platformdirs.user_state_dir("vmctl", appauthor=False))
    return private_dir(root.expanduser().absolute())


def cache_home() -> Path:
    """Where rebuildable artefacts live (guest images, probe results).

    Kept apart from the state folder (platformdirs' user cache folder,
    overridable with VMCTL_CACHE): a throwaway VMCTL_HOME, as every test
    uses, still finds the image that scripts/install.sh built once.
    """
    env = os.environ.get("VMCTL_CACHE")
    if env:
        root = Path(env)
    else:
        import platformdirs

        root = Path(platformdirs.user_cache_dir("vmctl", appauthor=False))
    return private_dir(root.expanduser().absolute())


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def check_name(name: str, what: str = "name") -> str:
    """Refuse names that could escape the state folder or break QEMU options."""
    if not NAME_RE.match(name):
        raise ConfigError(
            f"invalid {what} {name!r}",
            "use 1-40 characters: lower-case letters, digits, '.', '_' or '-'",
        )
    return name


def check_socket_path(path: Path) -> Path:
    """Refuse a UNIX socket path longer than the kernel accepts."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(
            f"socket path too long ({len(os.fsencode(path))} bytes): {path}",
            "set VMCTL_HOME to a shorter folder",
        )
    return path


@dataclass(frozen=True)
class ServerPaths:
    """Files of one `vmctl serve` instance."""

    root: Path

    @property
    def meta(self) -> Path:
        return self.root / "server.json"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def runtime(self) -> Path:
        """Removed when the server stops."""
        return self.root / "run"

    @property
    def socket(self) -> Path:
        return check_socket_path(self.runtime / "llama.sock")

    @property
    def cache(self) -> Path:
        """The only folder llama-server may write."""
        return self.runtime / "cache"

    @property
    def sandbox_dir(self) -> Path:
        """Rendered sandbox profile, for `sandbox-exec -f`."""
        return self.runtime / "sandbox"


@dataclass(frozen=True)
class InstancePaths:
    """Files of one guest instance."""

    root: Path

    @property
    def meta(self) -> Path:
        return self.root / "instance.json"

    @property
    def qmp(self) -> Path:
        return check_socket_path(self.root / "qmp.sock")

    @property
    def console(self) -> Path:
        return check_socket_path(self.root / "console.sock")

    @property
    def exec(self) -> Path:
        """Base name of the exec port's FIFO pair (QEMU's `pipe` chardev)."""
        return self.root / "exec"

    @property
    def exec_in(self) -> Path:
        """Requests to the guest: QEMU reads this FIFO."""
        return self.root / "exec.in"

    @property
    def exec_out(self) -> Path:
        """Replies from the guest: QEMU writes this FIFO."""
        return self.root / "exec.out"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def overlay(self) -> Path:
        return self.root / "overlay.qcow2"

    @property
    def fwcfg(self) -> Path:
        """Files handed to the guest through fw_cfg."""
        return self.root / "fwcfg"

    @property
    def relay(self) -> Path:
        """The guestfwd relay script (no commas: it sits inside -netdev)."""
        return self.root / "relay"

    @property
    def proxy_socket(self) -> Path:
        """The guest's egress proxy sidecar listens here for the guestfwd connector."""
        return check_socket_path(self.root / "proxy.sock")

    @property
    def proxy_connect(self) -> Path:
        """The guestfwd script for the proxy address (no commas, like `relay`)."""
        return self.root / "proxy-connect"

    @property
    def proxy_log(self) -> Path:
        return self.root / "proxy.log"

    @property
    def lock(self) -> Path:
        return self.root / "lock"


def servers_dir() -> Path:
    return private_dir(home() / "servers")


def instances_dir() -> Path:
    return private_dir(home() / "instances")


def clients_dir() -> Path:
    return private_dir(home() / "clients")


def events_dir() -> Path:
    """Event logs (see vmctl.events): kept apart so they outlive their subject."""
    return private_dir(home() / "events")


def images_dir() -> Path:
    return private_dir(cache_home() / "images")


def server(name: str) -> ServerPaths:
    return ServerPaths(servers_dir() / check_name(name, "server name"))


def instance(name: str) -> InstancePaths:
    return InstancePaths(instances_dir() / check_name(name, "instance name"))


def client(name: str) -> Path:
    return clients_dir() / check_name(name, "client name")
