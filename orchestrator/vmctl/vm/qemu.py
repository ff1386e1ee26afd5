"""The QEMU command line, built by a pure function from a validated spec.

Nothing here starts a process or touches the disk: `qemu_argv` maps an
`InstanceSpec`, an image manifest, the instance's paths and the chosen
accelerator to a list of strings, so golden tests pin every flag.

The 9p workspace share uses `security_model=mapped-xattr` on purpose. With
`passthrough` (or `none`, when QEMU runs as root) a hostile guest's
chown/chmod/mknod are applied for real on the host: setuid-root binaries,
device nodes and symlinks pointing anywhere could appear in the user's
folder. Under `mapped-xattr` every file the guest creates is a plain
file or folder owned by the user running vmctl, with fixed modes
(`fmode=0644`, `dmode=0755`); the guest's owners, modes, special files
and even symlinks live only in `user.virtfs.*` xattrs (a guest-made
symlink is a regular file on the host). QEMU alone would keep the guest's
executable bits in the xattr too; the guest's sidecar carries a regular
file's three x bits both ways on Linux (`vmctl.sidecars.modes`; never
setuid/setgid). The host filesystem must support user xattrs. Who the user
is inside the guest: `vmctl.vm.idmap`. Under `--share virtiofs` QEMU only
connects to vmctl.vm.virtiofs's daemon, which is confined instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from vmctl import contract
from vmctl.errors import ConfigError
from vmctl.paths import InstancePaths
from vmctl.vm.accel import Accel
from vmctl.vm.idmap import IdMap
from vmctl.vm.spec import InstanceSpec

RELAY_PATH_RE = re.compile(r"^[A-Za-z0-9/._+-]+$")
WORKSPACE_9P = "security_model=mapped-xattr,fmode=0644,dmode=0755"
#: q35 without the devices no vmctl guest uses (AHCI, SMBus, PS/2, VMware
#: port): the kernel probes fewer. qboot instead of SeaBIOS: every image
#: boots its kernel directly, and under TCG SeaBIOS costs about 0.3 s of CPU
#: (bench/boot.py's boot_firmware_*).
Q35_OPTIONS = "sata=off,smbus=off,i8042=off,vmport=off"
X86_FIRMWARE = "qboot.rom"
#: The guest RAM's shared memory backend under virtio-fs (`workspace_argv`, `machine_option`).
SHARED_RAM = "mem"


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
    extra = f"{keys['instance']}={spec.name} {keys['net']}={spec.net}"
    extra += f" {keys['workspace']}={spec.share}"
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


def workspace_argv(spec: InstanceSpec, paths: InstancePaths) -> list[str]:
    """The writable workspace: 9p mapped by QEMU, or virtio-fs from vmctl.vm.virtiofs's daemon.

    vhost-user needs the guest's RAM in shared memory (the daemon maps it);
    `machine_option` names the backend defined here.
    """
    tag = contract.workspace_tag()
    if spec.share == "virtiofs":
        return [
            "-object", f"memory-backend-memfd,id={SHARED_RAM},size={spec.mem},share=on",
            "-chardev", f"socket,id=vfs,path={opt(paths.virtiofs_socket)}",
            "-device", f"vhost-user-fs-pci,chardev=vfs,tag={opt(tag)},queue-size=1024",
        ]  # fmt: skip
    return [
        "-fsdev", f"local,id=ws,path={opt(spec.workspace)},{WORKSPACE_9P}",
        "-device", f"virtio-9p-pci,fsdev=ws,mount_tag={opt(tag)}",
    ]  # fmt: skip


def share_argv(spec: InstanceSpec, manifest: ManifestLike) -> list[str]:
    """The image's read-only shares (over 9p)."""
    out: list[str] = []
    for i, share in enumerate(manifest.shares):
        ro = ",readonly=on" if share.readonly else ""
        model = "security_model=none" if share.readonly else WORKSPACE_9P
        out += ["-fsdev", f"local,id=sh{i},path={opt(share.path)},{model}{ro}"]
        out += ["-device", f"virtio-9p-pci,fsdev=sh{i},mount_tag={opt(share.tag)}"]
    return out


def channel_argv(paths: InstancePaths, console_fd: int) -> list[str]:
    """QMP and the log console on sockets; each exec port on a FIFO pair.

    The console's listening socket is `console_fd`, bound by vmctl, which
    has already connected to it (vmctl.vm.console.listen): `wait=on` makes
    QEMU take that connection before the CPU starts, so the boot runs at
    once (no `-S` and QMP `cont`) and no line of it is missed on the way
    to the ready marker. Later `vmctl console` clients connect by path.

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
        f"socket,id=con,fd={console_fd},server=on,wait=on"
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


def machine_option(accel: Accel, share: str = "9p") -> str:
    """`-M`'s value: the accelerator's machine, trimmed where it is q35.

    Under virtio-fs the RAM is `workspace_argv`'s shared memory backend.
    """
    value = f"{accel.machine},{Q35_OPTIONS}" if accel.machine == "q35" else accel.machine
    return value + (f",memory-backend={SHARED_RAM}" if share == "virtiofs" else "")


def qemu_argv(
    spec: InstanceSpec,
    manifest: ManifestLike,
    paths: InstancePaths,
    accel: Accel,
    qemu: str = "qemu-system-x86_64",
    ids: IdMap | None = None,
    *,
    console_fd: int,
) -> list[str]:
    """The full QEMU command line; the user's extra arguments go last, verbatim.

    `ids` (vmctl.vm.idmap) puts its user-namespace prefix first and its
    kernel command-line keys after vmctl's; `console_fd` is the console's
    listening socket, which QEMU inherits.
    """
    argv = list(ids.prefix) if ids else []
    argv += [qemu, "-name", paths.qemu_name, "-M", machine_option(accel, spec.share)]
    argv += ["-accel", accel.name, "-cpu", accel.cpu, "-m", spec.mem, "-smp", str(spec.cpus)]
    argv += ["-nodefaults", "-no-user-config", "-no-reboot", "-display", "none"]
    if accel.arch == "x86_64":
        argv += ["-bios", X86_FIRMWARE]
    argv += ["-kernel", no_comma(manifest.kernel, "kernel")]
    argv += ["-initrd", no_comma(manifest.initrd, "initrd")]
    argv += ["-append", kernel_cmdline(spec, manifest.cmdline, ids.cmdline() if ids else "")]
    disk = getattr(manifest, "disk", None)
    if disk is not None:
        argv += ["-drive", f"if=virtio,format=qcow2,file={opt(paths.overlay)}"]
    argv += channel_argv(paths, console_fd)
    argv += ["-device", "virtio-rng-pci"]
    argv += workspace_argv(spec, paths)
    argv += share_argv(spec, manifest)
    argv += fw_cfg_argv(spec, paths)
    argv += net_argv(spec, paths)
    argv += mirror_argv(spec, paths)
    return argv + list(spec.extra_args)
