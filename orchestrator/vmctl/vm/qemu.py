"""The QEMU command line, built by a pure function from a validated spec.

Nothing here starts a process or touches the disk: `qemu_argv` maps an
`InstanceSpec`, an image manifest, the instance's paths and the chosen
accelerator to a list of strings, so golden tests pin every flag.

The workspace share uses `security_model=mapped-xattr` on purpose. With
`passthrough` (or `none`, when QEMU runs as root) a hostile guest's
chown/chmod/mknod are applied for real on the host: setuid-root binaries,
device nodes and symlinks pointing anywhere could appear in the user's
folder. Under `mapped-xattr` every file the guest creates is a plain
file or folder owned by the user running vmctl, with fixed modes
(`fmode=0644`, `dmode=0755`); the guest's owners, modes, special files
and even symlinks live only in `user.virtfs.*` xattrs (a guest-made
symlink is a regular file on the host). The cost: executable bits set in
the guest do not reach the host, and the host filesystem must support
user xattrs. Who the user is inside the guest: `vmctl.vm.idmap`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vmctl import contract
from vmctl.errors import ConfigError
from vmctl.paths import InstancePaths, check_name
from vmctl.vm.accel import Accel
from vmctl.vm.idmap import IdMap

NET_POLICIES = ("full", "model", "none")
MEM_RE = re.compile(r"^([1-9][0-9]*)([MG])$")
ENDPOINT_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")
RELAY_PATH_RE = re.compile(r"^[A-Za-z0-9/._+-]+$")
WORKSPACE_9P = "security_model=mapped-xattr,fmode=0644,dmode=0755"


class ShareLike(Protocol):
    @property
    def tag(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def readonly(self) -> bool: ...


class ManifestLike(Protocol):
    """What `qemu_argv` reads from `vmctl.images.ImageManifest`."""

    @property
    def kernel(self) -> Path: ...
    @property
    def initrd(self) -> Path: ...
    @property
    def cmdline(self) -> str: ...
    @property
    def shares(self) -> list[ShareLike] | tuple[ShareLike, ...]: ...


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
        if not 1 <= self.cpus <= 64:
            raise ConfigError(f"--cpus {self.cpus} is out of range", "use 1 to 64")
        if self.policy is not None:
            from vmctl import egress

            egress.preset(self.policy)
            egress.resolve_map(self.resolve)
            if self.net != "model":
                raise ConfigError(f"--policy needs the guarded network, not --net {self.net}")
        hosts = [h for h, _ in self.forwards]
        if len(set(hosts)) != len(hosts):
            raise ConfigError("-p names the same host port twice")
        if not self.workspace.is_absolute():
            raise ConfigError(f"workspace {self.workspace} is not absolute")


def opt(value: str | Path) -> str:
    """Escape one value for QEMU's `key=value,...` option syntax (double commas)."""
    return str(value).replace(",", ",,")


def no_comma(value: str | Path, what: str) -> str:
    """Values QEMU never unescapes (-kernel, -initrd) must hold no comma."""
    if "," in str(value):
        raise ConfigError(f"{what} path contains a comma: {value}", "move it to a plain path")
    return str(value)


def relay_path(path: Path) -> str:
    """The guestfwd `cmd:` runs through /bin/sh inside -netdev: keep it boring."""
    if not RELAY_PATH_RE.match(str(path)):
        raise ConfigError(
            f"relay script path has characters QEMU/sh cannot take: {path}",
            "set VMCTL_HOME to a path of letters, digits, '/', '.', '_', '-'",
        )
    return str(path)


def kernel_cmdline(spec: InstanceSpec, base: str, ids: str = "") -> str:
    keys = contract.raw()["kernel_cmdline"]
    extra = f"{keys['instance']}={spec.name} {keys['net']}={spec.net} {keys['workspace']}=1"
    return " ".join(p for p in (base.strip(), extra, ids) if p)


def net_argv(spec: InstanceSpec, paths: InstancePaths) -> list[str]:
    """The network for a policy: nothing, plain SLiRP, or SLiRP to the model only."""
    if spec.net == "none":
        return ["-nic", "none"]
    net = contract.raw()["network"]
    fwds = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in spec.forwards)
    if spec.net == "full":
        netdev = f"user,id=n0{fwds}"
    else:
        relay = relay_path(paths.relay)
        netdev = (
            f"user,id=n0,net=10.0.2.0/24,host={net['slirp_host_when_restricted']},restrict=on"
            f",guestfwd=tcp:{net['model_host']}:{net['model_port']}-cmd:{relay}{fwds}"
        )
        if spec.policy is not None:  # the egress proxy, on the same guarded path
            connect = relay_path(paths.proxy_connect)
            netdev += f",guestfwd=tcp:{net['model_host']}:{net['proxy_port']}-cmd:{connect}"
    return ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]


def share_argv(spec: InstanceSpec, manifest: ManifestLike) -> list[str]:
    """The workspace (writable, mapped) plus the image's read-only shares."""
    tag = contract.workspace_tag()
    out = ["-fsdev", f"local,id=ws,path={opt(spec.workspace)},{WORKSPACE_9P}"]
    out += ["-device", f"virtio-9p-pci,fsdev=ws,mount_tag={opt(tag)}"]
    for i, share in enumerate(manifest.shares):
        ro = ",readonly=on" if share.readonly else ""
        model = "security_model=none" if share.readonly else WORKSPACE_9P
        out += ["-fsdev", f"local,id=sh{i},path={opt(share.path)},{model}{ro}"]
        out += ["-device", f"virtio-9p-pci,fsdev=sh{i},mount_tag={opt(share.tag)}"]
    return out


def channel_argv(paths: InstancePaths) -> list[str]:
    """QMP and the log console on sockets; each exec port on a FIFO pair.

    The exec ports use `pipe` chardevs: QEMU holds both FIFOs open, so the
    guest's side of a port stays connected between `vmctl exec` calls
    and its agent blocks in read() instead of seeing EOF and restarting,
    which made every call wait for a respawn (about a second).
    """
    execs: list[str] = []
    for n, port in enumerate(contract.exec_ports()):
        execs += ["-chardev", f"pipe,id=exec{n},path={opt(paths.exec(n))}"]
        execs += ["-device", f"virtserialport,chardev=exec{n},name={opt(port)}"]
    return [
        "-chardev", f"socket,id=qmp,path={opt(paths.qmp)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev",
        f"socket,id=con,path={opt(paths.console)},server=on,wait=off"
        f",logfile={opt(paths.console_log)},logappend=on",
        "-serial", "chardev:con",
        "-device", "virtio-serial-pci,id=vser0",
        *execs,
    ]  # fmt: skip


def mirror_argv(spec: InstanceSpec, paths: InstancePaths) -> list[str]:
    """Port mirroring: the guest's report port and a QMP monitor for the mirror sidecar."""
    if not spec.mirrors:
        return []
    port = contract.raw()["mirror"]["port"]
    return [
        "-chardev", f"socket,id=ports,path={opt(paths.ports)},server=on,wait=off",
        "-device", f"virtserialport,chardev=ports,name={opt(port)}",
        "-chardev", f"socket,id=mqmp,path={opt(paths.mirror_qmp)},server=on,wait=off",
        "-mon", "chardev=mqmp,mode=control",
    ]  # fmt: skip


def fw_cfg_argv(spec: InstanceSpec, paths: InstancePaths) -> list[str]:
    """One -fw_cfg per agent file; the file is named after the last part of its key."""
    known = {f.name for f in contract.fw_cfg_files()}
    out: list[str] = []
    for name in spec.fw_cfg:
        if name not in known:
            raise ConfigError(f"fw_cfg name {name!r} is not in the guest contract")
        out += ["-fw_cfg", f"name={opt(name)},file={opt(paths.fwcfg / Path(name).name)}"]
    return out


def qemu_argv(
    spec: InstanceSpec,
    manifest: ManifestLike,
    paths: InstancePaths,
    accel: Accel,
    qemu: str = "qemu-system-x86_64",
    ids: IdMap | None = None,
) -> list[str]:
    """The full QEMU command line; the user's extra arguments go last, verbatim.

    `ids` (vmctl.vm.idmap) puts its user-namespace prefix first and its
    kernel command-line keys after vmctl's.
    """
    argv = list(ids.prefix) if ids else []
    argv += [qemu, "-name", f"guest=vmctl-{spec.name}", "-M", accel.machine]
    argv += ["-accel", accel.name, "-cpu", accel.cpu, "-m", spec.mem, "-smp", str(spec.cpus)]
    # -S: the CPU waits until vmctl is attached to the serial console and
    # continues it over QMP, so no line of the boot is ever missed.
    argv += ["-S", "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none"]
    argv += ["-kernel", no_comma(manifest.kernel, "kernel")]
    argv += ["-initrd", no_comma(manifest.initrd, "initrd")]
    argv += ["-append", kernel_cmdline(spec, manifest.cmdline, ids.cmdline() if ids else "")]
    disk = getattr(manifest, "disk", None)
    if disk is not None:
        argv += ["-drive", f"if=virtio,format=qcow2,file={opt(paths.overlay)}"]
    argv += channel_argv(paths)
    argv += ["-device", "virtio-rng-pci"]
    argv += share_argv(spec, manifest)
    argv += fw_cfg_argv(spec, paths)
    argv += net_argv(spec, paths)
    argv += mirror_argv(spec, paths)
    return argv + list(spec.extra_args)


def overlay_argv(base: Path, fmt: str, overlay: Path) -> list[str]:
    """A throwaway qcow2 layer over a read-only base image."""
    return ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", fmt, str(overlay)]
