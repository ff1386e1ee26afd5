"""Every file of vmctl's state folder, named once.

The layout (below `home()`, default platformdirs' user state folder,
overridable with VMCTL_HOME)::

    servers/NAME/      server.json, config.json, server.log,
                       run/ (socket, cache, sandbox profile)
    instances/NAME/    instance.json, qmp.sock, console.sock, execN.{in,out,lock},
                       console.log, qemu.log, overlay.qcow2, fwcfg/, relay,
                       ports.sock, mirror-qmp.sock, forwards.json, mirror.log,
                       disk-floor.json
    clients/NAME/      a host client's private config and data (state/), per-run
                       sockets (run/PID/); its requests are in events/client-NAME.jsonl
    reviews/NAME/      review.json, manifest.json, work/ (the guest's private copy of the
                       workspace under `vmctl up --review`; outlives the instance)
    models/            digests recorded at download (models--ORG--REPO/), GGUF checks
                       (gguf-checked/)
    sandbox/           rendered sandbox profiles of `vmctl run` / `vmctl sandbox exec`
    policy/            rules.json: the egress rules of `vmctl policy`
    events/            one event log per subject (guest-NAME.jsonl, server-NAME.jsonl,
                       client-NAME.jsonl); outlives its subject until `vmctl rm`

and, below `cache_home()` (platformdirs' user cache folder, VMCTL_CACHE)::

    images/            built guest images, by content key (micro-KEY/), the kernels
                       (kernels/) and agents (agents/) they are made from
    accel/             accelerator probe results

Folders are created 0700. UNIX socket paths are checked against the
108-byte `sun_path` limit here, so callers never meet a truncated bind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vmctl.errors import ConfigError

# `vmctl exec` imports this module on its fast path (vmctl.entry): no
# dataclasses, re or platformdirs at import time.
SUN_PATH_MAX = 107  # 108 bytes including the terminating NUL
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")


def home() -> Path:
    """vmctl's state root, created 0700."""
    env = os.environ.get("VMCTL_HOME")
    if env:
        root = Path(env)
    elif sys.platform.startswith("linux"):  # platformdirs' answer, without its import cost
        xdg = os.environ.get("XDG_STATE_HOME", "")
        root = Path(xdg if xdg.strip() else "~/.local/state") / "vmctl"
    else:
        import platformdirs

        root = Path(platformdirs.user_state_dir("vmctl", appauthor=False))
    return private_dir(root.expanduser().absolute())


#: vmctl's own data: the guest contract, presets, the micro image's sources.
DATA = Path(__file__).parent / "data"


def data_text(rel: str) -> str:
    """A file of `DATA`, read by path: vmctl is never imported from a zip,
    and importlib.resources costs ~7 ms of imports before a guest starts."""
    return (DATA / rel).read_text(encoding="utf-8")


def cache_home() -> Path:
    """Where rebuildable artefacts live (guest images, probe results).

    Kept apart from the state folder (platformdirs' user cache folder,
    overridable with VMCTL_CACHE): a throwaway VMCTL_HOME, as every test
    uses, still finds the image that scripts/install.sh built once.
    """
    env = os.environ.get("VMCTL_CACHE")
    if env:
        root = Path(env)
    elif sys.platform.startswith("linux"):  # platformdirs' answer, as home() does
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        root = Path(xdg if xdg.strip() else "~/.cache") / "vmctl"
    else:
        import platformdirs

        root = Path(platformdirs.user_cache_dir("vmctl", appauthor=False))
    return private_dir(root.expanduser().absolute())


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def keep_newest(folder: Path, pattern: str, keep: int) -> None:
    """Remove all but the `keep` newest files matching `pattern`: a probe cache
    that gains a file per boot, QEMU or kernel stays bounded."""
    import contextlib  # not at module level: `vmctl exec`'s fast path imports paths

    def age(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    for old in sorted(folder.glob(pattern), key=age, reverse=True)[keep:]:
        with contextlib.suppress(OSError):  # best effort: it never fails the verb that probed
            old.unlink()


def check_name(name: str, what: str = "name") -> str:
    """Refuse names that could escape the state folder or break QEMU options."""
    ok = 0 < len(name) <= 40 and name[0] not in "._-" and set(name) <= NAME_CHARS
    if not ok:
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


class _Folder:
    """A state folder, compared by its root (a frozen value, like a dataclass)."""

    __slots__ = ("root",)
    root: Path

    def __init__(self, root: Path) -> None:
        object.__setattr__(self, "root", root)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.root == self.root  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.root))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r})"


class _At:
    """One file of a state folder, named once: `log = _At("server.log")`.

    A socket's path is checked against `sun_path` each time it is asked for.
    """

    __slots__ = ("rel", "socket")

    def __init__(self, rel: str, socket: bool = False) -> None:
        self.rel, self.socket = rel, socket

    def __get__(self, folder: _Folder, owner: type | None = None) -> Path:
        path = folder.root / self.rel
        return check_socket_path(path) if self.socket else path


class ServerPaths(_Folder):
    """Files of one `vmctl serve` instance."""

    meta = _At("server.json")
    config = _At("config.json")  # the ServerConfig a detached supervisor starts from
    log = _At("server.log")
    runtime = _At("run")  # removed when the server stops
    socket = _At("run/llama.sock", socket=True)
    routes = _At("run/routes.sock", socket=True)  # the gateway's, for sidecars (vmctl.routes)
    cache = _At("run/cache")  # the only folder llama-server may write
    sandbox_dir = _At("run/sandbox")  # the rendered profile, for `sandbox-exec -f`


class InstancePaths(_Folder):
    """Files of one guest instance."""

    meta = _At("instance.json")
    qmp = _At("qmp.sock", socket=True)
    console = _At("console.sock", socket=True)
    console_log = _At("console.log")
    qemu_log = _At("qemu.log")
    overlay = _At("overlay.qcow2")
    fwcfg = _At("fwcfg")  # files handed to the guest through fw_cfg
    relay = _At("relay")  # the guestfwd forwarder script (no commas: it sits inside -netdev)
    #: The guest sidecar's socket, where forwarders hand over guest connections;
    #: vmctl.vm.execchan spells it too, without importing this module (test_modes).
    sidecar = _At("sidecar.sock", socket=True)
    sidecar_config = _At("sidecar.json")
    sidecar_log = _At("sidecar.log")
    proxy_socket = _At("proxy.sock", socket=True)  # the egress proxy, for its guestfwd
    proxy_connect = _At("proxy-connect")  # the proxy's guestfwd script (no commas)
    proxy_log = _At("proxy.log")
    ports = _At("ports.sock", socket=True)  # listening-port reports (the contract's `mirror`)
    mirror_qmp = _At("mirror-qmp.sock", socket=True)  # the mirror's own: it never holds qmp
    forwards = _At("forwards.json")  # the mirror's live and skipped forwards, for status
    mirror_log = _At("mirror.log")
    disk_floor = _At("disk-floor.json")  # the floor and whether it paused the guest
    #: Present while the disk floor holds the guest paused: `vmctl exec` says so
    #: (vmctl.vm.execchan spells it too, without importing this module).
    paused = _At("paused")
    virtiofs_socket = _At("virtiofs.sock", socket=True)  # `--share virtiofs`, bound by vmctl
    virtiofs_log = _At("virtiofsd.log")

    @property
    def qemu_name(self) -> str:
        """QEMU's `-name` (its run directory is `root`): how an unrecorded QEMU is found."""
        return f"guest=vmctl-{self.root.name}"

    def exec(self, slot: int) -> Path:
        """Base name of exec port `slot`'s FIFO pair (QEMU's `pipe` chardev)."""
        return self.root / f"exec{slot}"

    def exec_fifos(self, slot: int) -> tuple[Path, Path, Path]:
        """Slot `slot`: frames to the guest (QEMU reads this FIFO), from it, and its lock.

        vmctl.vm.execchan.ExecChannel.for_instance spells the same names
        without importing this module (`vmctl exec` start-up counts).
        """
        base = self.exec(slot)
        return (
            base.with_name(base.name + ".in"),
            base.with_name(base.name + ".out"),
            base.with_name(base.name + ".lock"),
        )


class ReviewPaths(_Folder):
    """Files of one review copy (`vmctl up --review`); only `work` is shared with the guest."""

    meta = _At("review.json")
    manifest = _At("manifest.json")  # the snapshot: every entry of `work` at boot
    work = _At("work")


class ClientPaths(_Folder):
    """Files of one host client run by `vmctl run`."""

    @property
    def state(self) -> Path:
        """The client's own config and data (its HOME-like folder)."""
        return self.root / "state"

    def runtime(self, pid: int) -> Path:
        """Sockets of one run, removed when it ends."""
        return self.root / "run" / str(pid)

    def endpoint_socket(self, pid: int) -> Path:
        """The model endpoint relayed into the sandbox."""
        return check_socket_path(self.runtime(pid) / "ep.sock")


def servers_dir() -> Path:
    return private_dir(home() / "servers")


def instances_dir() -> Path:
    return private_dir(home() / "instances")


def clients_dir() -> Path:
    return private_dir(home() / "clients")


def events_dir() -> Path:
    """Event logs (see vmctl.events): kept apart so they outlive their subject."""
    return private_dir(home() / "events")


def policy_rules() -> Path:
    """The egress rules of `vmctl policy` (vmctl.egress), in a 0700 folder."""
    return private_dir(home() / "policy") / "rules.json"


def reviews_dir() -> Path:
    return private_dir(home() / "reviews")


def review(name: str) -> ReviewPaths:
    return ReviewPaths(reviews_dir() / check_name(name, "instance name"))


def images_dir() -> Path:
    return private_dir(cache_home() / "images")


def kernels_dir() -> Path:
    """Unpacked guest kernels and their modules, by package and version."""
    return images_dir() / "kernels"


def image_agents_dir() -> Path:
    """Agents installed for the micro image (opencode from npm), by version."""
    return images_dir() / "agents"


def accel_dir() -> Path:
    """Accelerator probe results (a KVM that works or not), by host key."""
    return private_dir(cache_home() / "accel")


def model_digests_dir(repo: str) -> Path:
    """sha256 digests recorded when a hub repo's files were downloaded."""
    return private_dir(home() / "models" / f"models--{repo.replace('/', '--')}")


def gguf_checked_dir() -> Path:
    """Stamps of GGUF files that passed the header check."""
    return private_dir(home() / "models" / "gguf-checked")


def sandbox_profiles_dir() -> Path:
    """Rendered sandbox profiles (SBPL) of host clients and `vmctl sandbox exec`."""
    return home() / "sandbox"


def server(name: str) -> ServerPaths:
    return ServerPaths(servers_dir() / check_name(name, "server name"))


def instance(name: str) -> InstancePaths:
    return InstancePaths(instances_dir() / check_name(name, "instance name"))


def client(name: str) -> Path:
    return clients_dir() / check_name(name, "client name")


def client_paths(name: str) -> ClientPaths:
    return ClientPaths(client(name))
