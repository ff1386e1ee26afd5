"""What a guest is, decided before QEMU starts, and what its state folder records.

`InstanceSpec` is the user's choice (`vmctl up` options), checked as it is
built so that every message names the option. `InstanceRecord` is
instance.json, parsed strictly: the spec as recorded plus the processes that
own the guest. Standard library only: the `vmctl exec` fast path reads the
record.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmctl.errors import ConfigError
from vmctl.paths import check_name
from vmctl.procs import ProcessRef
from vmctl.state import StateError, read_json, write_json

NET_POLICIES = ("full", "model", "none")
MEM_RE = re.compile(r"^([1-9][0-9]*)([MG])$")
ENDPOINT_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")


def parse_endpoint(value: str, option: str = "--model-endpoint") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), refusing anything else."""
    m = ENDPOINT_RE.match(value.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"{option} {value!r} is not HOST:PORT", "e.g. 127.0.0.1:8080")
    return m.group(1).strip("[]"), int(m.group(2))


def parse_forward(value: str) -> tuple[int, int]:
    """'-p HOST:GUEST' -> (host_port, guest_port)."""
    parts = value.split(":")
    if len(parts) != 2 or not all(p.isdigit() and 0 < int(p) < 65536 for p in parts):
        raise ConfigError(f"-p {value!r} is not HOST:GUEST", "e.g. -p 8000:8000 (ports 1-65535)")
    return int(parts[0]), int(parts[1])


def check_forwards_free(host_ports: list[int]) -> None:
    """A `-p` host port another program listens on, in one line before QEMU starts.

    QEMU would otherwise die with its whole -netdev line; bound as QEMU binds
    (SO_REUSEADDR on 127.0.0.1), so only a real listener counts.
    """
    for port in host_ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except PermissionError:
                continue  # privileged: vm.idmap names it for QEMU's own privileges
            except OSError:
                raise ConfigError(
                    f"-p {port}:...: host port {port} is already in use on 127.0.0.1",
                    "choose a free host port (see `ss -ltnp`)",
                ) from None


@dataclass(frozen=True)
class InstanceSpec:
    """Everything `vmctl up` decides before QEMU starts, checked in __post_init__."""

    name: str
    workspace: Path
    net: str = "none"
    model_endpoint: tuple[str, int] | None = None
    forwards: tuple[tuple[int, int], ...] = ()
    mem: str = "2G"
    cpus: int = 2
    accel: str = "auto"
    ephemeral: bool = False
    extra_args: tuple[str, ...] = field(default=())
    #: fw_cfg names (`opt/vmctl/...`) whose files sit in the instance's fwcfg/.
    fw_cfg: tuple[str, ...] = ()
    #: Egress preset (vmctl.egress) of the guest's proxy; None: no proxy.
    policy: str | None = None
    #: `--resolve HOST:ADDR` names for the proxy.
    resolve: tuple[str, ...] = ()
    #: Mirror the guest's listening TCP ports on the host's loopback (needs a network).
    mirror: bool = False
    #: The workspace's transport (guest contract `workspace.transports`), chosen
    #: by vmctl.vm.virtiofs.choose.
    share: str = "9p"
    #: Pause the guest while the workspace's filesystem has less free (bytes;
    #: vmctl.sidecars.floor); None: its default, 0: no floor.
    disk_floor: int | None = None

    @property
    def mirrors(self) -> bool:
        return self.mirror and self.net != "none"

    def __post_init__(self) -> None:
        check_name(self.name, "--name")
        if self.net not in NET_POLICIES:
            raise ConfigError(f"--net {self.net!r} is not one of {', '.join(NET_POLICIES)}")
        if self.net == "model" and self.model_endpoint is None:
            raise ConfigError("--net model needs a model endpoint", "pass --model-endpoint")
        if self.net == "none" and self.forwards:
            raise ConfigError("-p needs a network", "use --net model or --net full with -p")
        m = MEM_RE.match(self.mem)
        if not m or int(m.group(1)) * (1024 if m.group(2) == "G" else 1) < 128:
            raise ConfigError(f"--mem {self.mem!r} is not a size of at least 128M", "e.g. 2G")
        if self.disk_floor is not None and self.disk_floor < 0:
            raise ConfigError(f"--disk-floor {self.disk_floor} is negative", "0 turns it off")
        if not 1 <= self.cpus <= 64:
            raise ConfigError(f"--cpus {self.cpus} is out of range", "use 1 to 64")
        if self.policy is not None:
            # Here, not at the top: the `vmctl exec` fast path reads this module, and
            # egress (tomllib, ipaddress, its presets) measured ~10 ms of its start-up.
            from vmctl import egress

            egress.preset(self.policy)
            egress.resolve_map(self.resolve)
            if self.net != "model":
                raise ConfigError(f"--policy needs the guarded network, not --net {self.net}")
        if any(not 0 < p < 65536 for pair in self.forwards for p in pair):
            raise ConfigError(f"-p {self.forwards} has a port out of range", "use ports 1-65535")
        if self.model_endpoint is not None and not 0 < self.model_endpoint[1] < 65536:
            raise ConfigError(
                f"--model-endpoint port {self.model_endpoint[1]} is out of range", "use 1-65535"
            )
        hosts = [h for h, _ in self.forwards]
        if len(set(hosts)) != len(hosts):
            raise ConfigError("-p names the same host port twice")
        if not self.workspace.is_absolute():
            raise ConfigError(f"workspace {self.workspace} is not absolute")
        from vmctl import contract

        if self.share not in contract.transports():
            known = ", ".join(contract.transports())
            raise ConfigError(f"--share {self.share!r} is not one of {known}")


def _ref(data: dict[str, Any], key: str, path: Path) -> ProcessRef | None:
    raw = data.get(key)
    if raw is None:
        return None
    try:
        return ProcessRef.from_json(raw)
    except ValueError as e:
        raise StateError(f"{path}: field {key!r}: {e}") from None


def _typed(data: dict[str, Any], key: str, typ: type | tuple[type, ...], path: Path) -> Any:
    value = data.get(key)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ in (int, (int, float))):
        raise StateError(f"{path}: field {key!r} is missing or has the wrong type")
    return value


@dataclass(frozen=True)
class InstanceRecord:
    """instance.json: the spec as recorded, and the processes behind the guest.

    `owner` is the vmctl that runs a foreground guest (None once detached);
    `qemu` is None until QEMU has started. Liveness is derived from them.
    """

    name: str
    started: float
    image: str
    workspace: str
    net: str
    model_endpoint: str | None
    forwards: tuple[tuple[int, int], ...]
    mem: str
    cpus: int
    ephemeral: bool
    policy: str | None = None
    resolve: tuple[str, ...] = ()
    mirror: bool = False
    share: str = "9p"
    owner: ProcessRef | None = None
    qemu: ProcessRef | None = None
    #: The guest's egress proxy sidecar, while it has one.
    proxy: ProcessRef | None = None
    #: The sidecar mirroring the guest's ports (vmctl.sidecars.mirror), while it runs.
    mirror_sidecar: ProcessRef | None = None
    #: The guest's model path and watchdog (vmctl.sidecars.guestpath), while it runs.
    sidecar: ProcessRef | None = None
    #: The workspace's virtio-fs daemon (vmctl.vm.virtiofs), while it runs.
    virtiofsd: ProcessRef | None = None
    #: What `vmctl up` warned about (agents' tools off for a small context), for `status`.
    notices: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        spec: InstanceSpec,
        image: str,
        started: float,
        owner: ProcessRef,
        notices: tuple[str, ...] = (),
    ) -> InstanceRecord:
        endpoint = None if spec.model_endpoint is None else "{}:{}".format(*spec.model_endpoint)
        return cls(
            name=spec.name, started=started, image=image, workspace=str(spec.workspace),
            net=spec.net, model_endpoint=endpoint, forwards=spec.forwards, mem=spec.mem,
            cpus=spec.cpus, ephemeral=spec.ephemeral, policy=spec.policy, resolve=spec.resolve,
            mirror=spec.mirror, share=spec.share,
            owner=owner, notices=notices,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "started": self.started,
            "image": self.image,
            "owner": self.owner.to_json() if self.owner else None,
            "qemu": self.qemu.to_json() if self.qemu else None,
            "proxy": self.proxy.to_json() if self.proxy else None,
            "mirror": self.mirror_sidecar.to_json() if self.mirror_sidecar else None,
            "sidecar": self.sidecar.to_json() if self.sidecar else None,
            "virtiofsd": self.virtiofsd.to_json() if self.virtiofsd else None,
            "notices": list(self.notices),
            "spec": {
                "workspace": self.workspace,
                "net": self.net,
                "model_endpoint": self.model_endpoint,
                "forwards": [list(f) for f in self.forwards],
                "mem": self.mem,
                "cpus": self.cpus,
                "ephemeral": self.ephemeral,
                "policy": self.policy,
                "resolve": list(self.resolve),
                "mirror": self.mirror,
                "share": self.share,
            },
        }

    @classmethod
    def read(cls, path: Path) -> InstanceRecord:
        """Parse instance.json strictly (StateError on anything unexpected)."""
        data = read_json(path, {"name": str, "started": (int, float), "spec": dict})
        spec: dict[str, Any] = data["spec"]
        forwards = _typed(spec, "forwards", list, path)
        if not all(
            isinstance(f, list) and len(f) == 2 and all(type(p) is int for p in f) for f in forwards
        ):
            raise StateError(f"{path}: field 'forwards' is not a list of port pairs")
        endpoint, policy = spec.get("model_endpoint"), spec.get("policy")
        resolve = spec.get("resolve", [])
        for key, value in (("model_endpoint", endpoint), ("policy", policy)):
            if value is not None and not isinstance(value, str):
                raise StateError(f"{path}: field {key!r} has the wrong type")
        if not isinstance(resolve, list) or not all(isinstance(r, str) for r in resolve):
            raise StateError(f"{path}: field 'resolve' is not a list of names")
        return cls(
            name=data["name"],
            started=float(data["started"]),
            image=_typed(data, "image", str, path),
            workspace=_typed(spec, "workspace", str, path),
            net=_typed(spec, "net", str, path),
            model_endpoint=endpoint,
            forwards=tuple((f[0], f[1]) for f in forwards),
            mem=_typed(spec, "mem", str, path),
            cpus=_typed(spec, "cpus", int, path),
            ephemeral=_typed(spec, "ephemeral", bool, path),
            policy=policy,
            resolve=tuple(resolve),
            mirror=_typed({"mirror": False, **spec}, "mirror", bool, path),
            share=_typed({"share": "9p", **spec}, "share", str, path),
            owner=_ref(data, "owner", path),
            qemu=_ref(data, "qemu", path),
            proxy=_ref(data, "proxy", path),
            mirror_sidecar=_ref(data, "mirror", path),
            sidecar=_ref(data, "sidecar", path),
            virtiofsd=_ref(data, "virtiofsd", path),
            notices=_notices(data, path),
        )

    def write(self, path: Path) -> None:
        write_json(path, self.to_json())


def _notices(data: dict[str, Any], path: Path) -> tuple[str, ...]:
    value = data.get("notices", [])
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise StateError(f"{path}: field 'notices' is not a list of lines")
    return tuple(value)
