"""Golden QEMU command lines (every flag of every network policy, escaping) and the
accelerator choice behind them."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmctl.errors import ConfigError
from vmctl.paths import InstancePaths
from vmctl.vm.accel import Accel
from vmctl.vm.qemu import qemu_argv
from vmctl.vm.spec import InstanceSpec, parse_endpoint, parse_forward

TCG = Accel("tcg", "max", "q35", "x86_64")
ROOT = InstancePaths(Path("/st/instances/t1"))


@dataclass(frozen=True)
class Share:
    tag: str
    path: Path
    readonly: bool = True


@dataclass(frozen=True)
class Manifest:
    kernel: Path = Path("/img/vmlinux")
    initrd: Path = Path("/img/initrd.cpio")
    cmdline: str = "console=ttyS0 panic=-1"
    shares: tuple[Share, ...] = ()


HEAD = [
    "qemu-system-x86_64", "-name", "guest=vmctl-t1",
    "-M", "q35,sata=off,smbus=off,i8042=off,vmport=off",
    "-accel", "tcg", "-cpu", "max", "-m", "2G", "-smp", "2",
    "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
    "-bios", "qboot.rom", "-kernel", "/img/vmlinux", "-initrd", "/img/initrd.cpio",
]  # fmt: skip
CHANNELS = [
    "-chardev", "socket,id=qmp,path=/st/instances/t1/qmp.sock,server=on,wait=off",
    "-mon", "chardev=qmp,mode=control",
    "-chardev", "socket,id=con,fd=7,server=on,wait=on"
    ",logfile=/st/instances/t1/console.log,logappend=on",
    "-serial", "chardev:con",
    "-device", "virtio-serial-pci,id=vser0",
    "-chardev", "pipe,id=exec0,path=/st/instances/t1/exec0",
    "-device", "virtserialport,chardev=exec0,name=org.vmctl.exec.0",
    "-chardev", "pipe,id=exec1,path=/st/instances/t1/exec1",
    "-device", "virtserialport,chardev=exec1,name=org.vmctl.exec.1",
    "-chardev", "pipe,id=exec2,path=/st/instances/t1/exec2",
    "-device", "virtserialport,chardev=exec2,name=org.vmctl.exec.2",
    "-chardev", "pipe,id=exec3,path=/st/instances/t1/exec3",
    "-device", "virtserialport,chardev=exec3,name=org.vmctl.exec.3",
    "-device", "virtio-rng-pci",
    "-fsdev", "local,id=ws,path=/home/u/proj,security_model=mapped-xattr,fmode=0644,dmode=0755",
    "-device", "virtio-9p-pci,fsdev=ws,mount_tag=workspace",
]  # fmt: skip


def argv(**kw: object) -> list[str]:
    spec = InstanceSpec(name="t1", workspace=Path("/home/u/proj"), **kw)  # type: ignore[arg-type]
    return qemu_argv(spec, Manifest(), ROOT, TCG, console_fd=7)


def append(net: str, share: str = "9p") -> list[str]:
    line = f"console=ttyS0 panic=-1 vmctl.instance=t1 vmctl.net={net} vmctl.workspace={share}"
    return ["-append", line]


def test_net_none_golden() -> None:
    assert argv(net="none") == [*HEAD, *append("none"), *CHANNELS, "-nic", "none"]


def test_net_full_golden_with_loopback_forwards() -> None:
    got = argv(net="full", forwards=((8000, 80), (2222, 22)))
    netdev = "user,id=n0,hostfwd=tcp:127.0.0.1:8000-:80,hostfwd=tcp:127.0.0.1:2222-:22"
    tail = ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]
    assert got == [*HEAD, *append("full"), *CHANNELS, *tail]


def test_net_model_golden_restricts_and_relays() -> None:
    got = argv(
        net="model",
        model_endpoint=("127.0.0.1", 8081),
        fw_cfg=("opt/vmctl/opencode.json", "opt/vmctl/env"),
        extra_args=("-snapshot", "-d", "guest_errors"),
    )
    netdev = (
        "user,id=n0,net=10.0.2.0/24,host=10.0.2.254,restrict=on"
        ",guestfwd=tcp:10.0.2.2:8080-cmd:/st/instances/t1/relay"
    )
    tail = [
        "-fw_cfg", "name=opt/vmctl/opencode.json,file=/st/instances/t1/fwcfg/opencode.json",
        "-fw_cfg", "name=opt/vmctl/env,file=/st/instances/t1/fwcfg/env",
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
        "-snapshot", "-d", "guest_errors",
    ]  # fmt: skip
    assert got == [*HEAD, *append("model"), *CHANNELS, *tail]


def test_virtiofs_golden_shares_ram_and_drops_the_9p_workspace() -> None:
    """vhost-user maps the guest's RAM: a memfd backend the machine names; no 9p workspace."""
    got = argv(net="none", share="virtiofs")
    head = [a.replace("vmport=off", "vmport=off,memory-backend=mem") for a in HEAD]
    workspace = [
        "-object", "memory-backend-memfd,id=mem,size=2G,share=on",
        "-chardev", "socket,id=vfs,path=/st/instances/t1/virtiofs.sock",
        "-device", "vhost-user-fs-pci,chardev=vfs,tag=workspace,queue-size=1024",
    ]  # fmt: skip
    channels = CHANNELS[: CHANNELS.index("-fsdev")]
    assert got == [*head, *append("none", "virtiofs"), *channels, *workspace, "-nic", "none"]


def test_commas_are_doubled_in_option_values() -> None:
    spec = InstanceSpec(name="t1", workspace=Path("/w/a,b"))
    paths = InstancePaths(Path("/st,x/t1"))
    m = Manifest(shares=(Share("store", Path("/nix/st,ore")),))
    got = qemu_argv(spec, m, paths, TCG, console_fd=7)
    assert "local,id=ws,path=/w/a,,b,security_model=mapped-xattr,fmode=0644,dmode=0755" in got
    assert "local,id=sh0,path=/nix/st,,ore,security_model=none,readonly=on" in got
    assert "socket,id=qmp,path=/st,,x/t1/qmp.sock,server=on,wait=off" in got


def test_relay_path_with_comma_or_space_is_refused() -> None:
    spec = InstanceSpec(name="t1", workspace=Path("/w"), net="model", model_endpoint=("h", 1))
    for bad in ("/st,x/t1", "/st x/t1"):
        with pytest.raises(ConfigError, match="relay script path"):
            qemu_argv(spec, Manifest(), InstancePaths(Path(bad)), TCG, console_fd=7)


def test_kernel_path_with_comma_is_refused() -> None:
    spec = InstanceSpec(name="t1", workspace=Path("/w"))
    with pytest.raises(ConfigError, match="comma"):
        qemu_argv(spec, Manifest(kernel=Path("/i,mg/vmlinux")), ROOT, TCG, console_fd=7)


def test_kvm_uses_host_cpu_and_aarch64_uses_virt() -> None:
    spec = InstanceSpec(name="t1", workspace=Path("/w"))
    kvm = qemu_argv(spec, Manifest(), ROOT, Accel("kvm", "host", "q35", "x86_64"), console_fd=7)
    assert kvm[kvm.index("-accel") + 1] == "kvm" and kvm[kvm.index("-cpu") + 1] == "host"
    arm = qemu_argv(
        spec, Manifest(), ROOT, Accel("tcg", "max", "virt", "aarch64"), "qa", console_fd=7
    )
    assert arm[:5] == ["qa", "-name", "guest=vmctl-t1", "-M", "virt"]
    assert "-bios" not in arm  # qboot is x86 firmware; virt boots the kernel itself


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"name": "Bad,Name"}, "invalid --name"),
        ({"net": "open"}, "--net 'open'"),
        ({"net": "model"}, "needs a model endpoint"),
        ({"forwards": ((80, 80),)}, "-p needs a network"),
        ({"mem": "64M"}, "--mem"),
        ({"mem": "2T"}, "--mem"),
        ({"cpus": 0}, "--cpus"),
        ({"workspace": Path("rel")}, "not absolute"),
        ({"fw_cfg": ("opt/vmctl/evil",)}, "not in the guest contract"),
    ],
)
def test_spec_is_validated_naming_the_option(kw: dict[str, object], msg: str) -> None:
    args: dict[str, object] = {"name": "t1", "workspace": Path("/w"), **kw}
    with pytest.raises(ConfigError, match=msg):
        qemu_argv(InstanceSpec(**args), Manifest(), ROOT, TCG, console_fd=7)  # type: ignore[arg-type]


def test_endpoint_and_forward_parsing() -> None:
    assert parse_endpoint("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_endpoint("[::1]:9") == ("::1", 9)
    assert parse_forward("8000:80") == (8000, 80)
    for bad in ("127.0.0.1", "h:0", "h:99999", "a b:1", "h:1,x"):
        with pytest.raises(ConfigError):
            parse_endpoint(bad)
    for bad in ("80", "0:80", "a:b", "1:2:3"):
        with pytest.raises(ConfigError):
            parse_forward(bad)


def test_kvm_verdicts_are_remembered_and_the_folder_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmctl import paths
    from vmctl.vm import accel

    monkeypatch.setenv("VMCTL_CACHE", str(tmp_path / "cache"))
    asked: list[Path | None] = []

    def probe(qemu: str, arch: str, kernel: Path | None = None) -> str | None:
        asked.append(kernel)
        return f"no KVM for {kernel}"

    monkeypatch.setattr(accel, "probe_kvm", probe)
    qemu = sys.executable  # any file: the key is its path, size and mtime
    kernels = [tmp_path / f"vmlinux-{i}" for i in range(accel.KEEP_VERDICTS + 4)]
    for i, kernel in enumerate(kernels):
        assert accel.kvm_problem(qemu, "x86_64", kernel) == f"no KVM for {kernel}"
        os.utime(accel._cache_file(qemu, kernel), (1000 + i, 1000 + i))
    assert len(list(paths.accel_dir().glob("kvm-*.json"))) == accel.KEEP_VERDICTS
    asked.clear()
    assert accel.kvm_problem(qemu, "x86_64", kernels[-1]) == f"no KVM for {kernels[-1]}"
    assert asked == []  # the newest verdict is remembered, not probed again
    accel.kvm_problem(qemu, "x86_64", kernels[0])
    assert asked == [kernels[0]]  # the oldest went, so it is probed again
