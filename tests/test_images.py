"""Image manifests, the micro builder and the guest side of the contract.

The QEMU tests boot the real micro image with a raw QEMU command (no
vmctl host code), so they pin the guest half of docs/guest-contract.md:
markers, fw_cfg files, the workspace, the exec protocol, power-down.
"""

from __future__ import annotations

import json
import lzma
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import platformdirs
import pytest

from conftest import need
from vmctl import contract
from vmctl.errors import ConfigError, VMError
from vmctl.images import choose, micro, micro_agents, micro_kernel
from vmctl.images import manifest as images
from vmctl.images.cpio import Archive
from vmctl.vm.execchan import ExecChannel

AGENT = Path(micro.__file__).parents[1] / "data" / "guest" / "vmctl-exec-agent.sh"


@pytest.fixture
def image_cache(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shared image cache (built by scripts/install.sh): never rebuilt per test."""
    default = Path(platformdirs.user_cache_dir("vmctl", appauthor=False))
    cache = Path(os.environ.get("VMCTL_CACHE") or default)
    monkeypatch.setenv("VMCTL_CACHE", str(cache))
    return cache


def _manifest(tmp: Path, **over: object) -> Path:
    (tmp / "k").write_bytes(b"kernel")
    (tmp / "i").write_bytes(b"initrd")
    (tmp / "agents").mkdir(exist_ok=True)
    data: dict[str, object] = {
        "format": "vmctl-image/1",
        "name": "t",
        "system": "x86_64-linux",
        "kernel": "k",
        "initrd": "i",
        "cmdline": "console=ttyS0",
        "shares": [{"tag": "agents", "path": "agents", "readonly": True}],
        "contract": contract.raw()["version"],
        "features": ["opencode"],
    }
    data.update(over)
    (tmp / "manifest.json").write_text(json.dumps(data))
    return tmp / "manifest.json"


def test_manifest_resolves_relative_paths(tmp_path: Path) -> None:
    m = images.load_manifest(_manifest(tmp_path))
    assert m.kernel == tmp_path / "k" and m.initrd == tmp_path / "i"
    assert m.shares == (images.Share("agents", tmp_path / "agents", True),)
    assert m.features == ("opencode",)
    assert choose.resolve_image(str(tmp_path)).path == m.path


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"format": "vmctl-image/2"}, "format"),
        ({"kernel": "missing"}, "kernel file"),
        ({"initrd": "missing"}, "initrd file"),
        ({"extra": 1}, "unknown keys"),
        ({"contract": 1}, "contract"),
        ({"system": "riscv64-linux"}, "system"),
        ({"shares": [{"tag": "workspace", "path": "agents"}]}, "reserved"),
        ({"shares": [{"tag": "a", "path": "agents", "readonly": "yes"}]}, "readonly"),
        ({"shares": [{"tag": "a", "path": "nowhere"}]}, "missing"),
    ],
)
def test_manifest_loader_is_strict(tmp_path: Path, over: dict[str, object], words: str) -> None:
    with pytest.raises(VMError) as e:
        images.load_manifest(_manifest(tmp_path, **over))
    assert words in e.value.message and "\n" not in e.value.message


def test_unknown_image_name_and_agent_are_refused() -> None:
    with pytest.raises(VMError, match="unknown image"):
        choose.resolve_image("ubuntu")
    with pytest.raises(ConfigError, match="unknown agent"):
        micro.build_micro(("aider",))


def test_vmlinux_is_cut_out_of_the_xz_stream() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    packed = lzma.compress(elf, format=lzma.FORMAT_XZ)
    bzimage = b"MZ" + b"\0" * 100 + b"\xfd7zXZ\x00junk" + packed + b"tail"
    assert micro_kernel.extract_vmlinux(bzimage) == elf
    with pytest.raises(VMError):
        micro_kernel.extract_vmlinux(b"no kernel here")


def test_modules_load_after_their_dependencies() -> None:
    dep = (
        "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n"
        "kernel/net/9p/9pnet.ko:\nkernel/fs/netfs/netfs.ko:\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/virtio_ring.ko\n"
        "kernel/virtio_ring.ko:\n"
    )
    order = micro_kernel.load_order(micro_kernel.parse_modules_dep(dep), ("9pnet_virtio", "9p"))
    assert order.index("kernel/net/9p/9pnet.ko") < order.index("kernel/fs/9p/9p.ko")
    assert order.index("kernel/virtio_ring.ko") < order.index("kernel/net/9p/9pnet_virtio.ko")
    assert len(order) == len(set(order)) == 5
    with pytest.raises(VMError, match="not found"):
        micro_kernel.load_order({}, ("9p",))


def test_modules_are_shipped_without_their_signature() -> None:
    body = b"\x7fELF module body"
    sig = b"S" * 40
    info = bytes([0, 0, 2, 0, 0, 0, 0, 0]) + len(sig).to_bytes(4, "big")
    signed = body + sig + info + b"~Module signature appended~\n"
    assert micro.unsigned(signed) == body
    assert micro.unsigned(body) == body


def test_cpio_states_owners_and_modes(tmp_path: Path) -> None:
    need(shutil.which("cpio") is not None, "cpio is not installed")
    a = Archive()
    a.file("home/agent/x", b"hello", 0o600, 1000, 1000)
    a.symlink("bin/sh", "/bin/busybox")
    a.dir("tmp", 0o1777)
    with open(tmp_path / "a.cpio", "wb") as out:
        a.write(out)
    listing = subprocess.run(
        ["cpio", "-itv", "--numeric-uid-gid", "-F", str(tmp_path / "a.cpio")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "-rw-------   1 1000     1000            5" in listing
    assert "bin/sh -> /bin/busybox" in listing and "drwxrwxrwt" in listing
    assert (tmp_path / "a.cpio").stat().st_size % 512 == 0


def test_init_renders_the_contract() -> None:
    text = micro.render_init(
        ["kernel/fs/9p/9p.ko", "kernel/fs/fuse/fuse.ko", "kernel/fs/fuse/virtiofs.ko"],
        ("opencode",),
    )
    c = contract.raw()
    for marker in ("boot_marker", "ready_marker", "poweroff_marker"):
        assert c["console"][marker] in text
    for f in contract.fw_cfg_files():
        assert f'"$fw/"{f.name}/raw' in text and f.dest in text
    assert 'umask 0177\n    cat "$fw/"opt/vmctl/env/raw >/etc/vmctl/env' in text
    assert 'chown "$auid:$agid" $owned' in text  # the agent's files, in one process
    assert "chmod 0755 /  #" in text  # the root is not world-writable
    for t in contract.transports().values():  # each transport, with the contract's options
        assert f"wsfs={t.fstype} wsopts={shlex.quote(t.options)}" in text
    assert "mount_tag" not in text
    assert "modprobe -a 9p 2>" in text  # one process loads every boot module, by name
    assert "modprobe -a fuse virtiofs 2>" in text  # virtio-fs's only when the host asks
    subprocess.run(["busybox", "sh", "-n", "-c", text], check=True)
    for shell in (["busybox", "sh"], ["bash", "--posix"]):
        subprocess.run([*shell, "-n", str(AGENT)], check=True)


def test_each_agent_gets_its_own_read_only_share() -> None:
    text = micro.render_init([], ("claude", "llm"))
    for name in ("claude", "llm"):
        assert (
            f"mount -t 9p -o {micro_agents.SHARE_OPTIONS} agent-{name} /opt/vmctl/agents/{name}"
            in text
        )
    assert "agent-opencode" not in text and "agent-" not in micro.render_init([], ())
    wrapper = micro_agents.LLM_WRAPPER.format(root="/opt/vmctl/agents/llm")
    subprocess.run(["busybox", "sh", "-n", "-c", wrapper], check=True)
    assert [t.name for t in micro_agents.host_tools(("claude",))] == ["rg", "bash"]


class Port:
    """The host end of the exec channel (vmctl's ExecChannel): stdout and stderr merged."""

    def __init__(self, chan: ExecChannel) -> None:
        self.chan = chan

    def run(self, command: str, timeout: float = 60) -> tuple[bytes, int]:
        out: list[bytes] = []
        status = self.chan.run(command, out.append, timeout=timeout)
        return b"".join(out), status


def test_micro_build_is_cached_and_keyed(
    image_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The micro image is made from Debian's packages (apt); not in a Nix build sandbox.
    need(shutil.which("apt-cache") is not None, "Debian's apt-cache")
    first = micro.build_micro()
    artefacts = ("manifest.json", "vmlinux", "initrd.cpio")
    built = {n: (first.parent / n).stat().st_mtime_ns for n in artefacts}
    assert micro.build_micro() == first
    # A cache hit rewrites no artefact (timing it would only measure the machine's load).
    assert {n: (first.parent / n).stat().st_mtime_ns for n in artefacts} == built
    assert first.parent.parent == image_cache / "images"
    m = images.load_manifest(first)
    assert m.kernel.stat().st_size > 5_000_000 and m.kernel.read_bytes()[:4] == b"\x7fELF"
    assert m.features == () and m.shares == ()
    key = micro.image_key(micro.micro_inputs(())[0])
    assert first.parent.name == f"micro-{key}"
    real = micro.guest_file
    monkeypatch.setattr(micro, "guest_file", lambda n: real(n) + ("\n# changed" * (n != "x")))
    assert micro.image_key(micro.micro_inputs(())[0]) != key


class Guest:
    """One raw QEMU running the micro image, every socket in one folder."""

    def __init__(self, qemu: Path, manifest: images.ImageManifest, root: Path, ws: Path) -> None:
        self.root, self.log = root, root / "console.log"
        fw = root / "opencode.json"
        fw.write_text('{"model": "llama/test"}\n')
        (root / "env").write_text("OPENAI_BASE_URL=http://10.0.2.2:8080/v1\nOPENAI_API_KEY=k $x\n")
        argv = [str(qemu), "-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1024"]
        argv += ["-nodefaults", "-nographic", "-no-reboot", "-serial", f"file:{self.log}"]
        argv += ["-kernel", str(manifest.kernel), "-initrd", str(manifest.initrd)]
        argv += [
            "-append",
            f"{manifest.cmdline} vmctl.instance=t vmctl.net=model vmctl.workspace=9p",
        ]
        argv += [
            "-fsdev",
            f"local,id=ws,path={ws},security_model=mapped-xattr,fmode=0644,dmode=0755",
        ]
        argv += ["-device", "virtio-9p-pci,fsdev=ws,mount_tag=workspace"]
        for i, s in enumerate(manifest.shares):
            argv += ["-fsdev", f"local,id=s{i},path={s.path},security_model=none,readonly=on"]
            argv += ["-device", f"virtio-9p-pci,fsdev=s{i},mount_tag={s.tag}"]
        argv += ["-fw_cfg", f"name=opt/vmctl/opencode.json,file={fw}"]
        argv += ["-fw_cfg", f"name=opt/vmctl/env,file={root / 'env'}"]
        argv += ["-device", "virtio-serial-pci"]
        for n, name in enumerate(contract.exec_ports()[:2]):  # the guest serves any number
            for end in ("in", "out"):
                os.mkfifo(root / f"exec{n}.{end}", 0o600)
            argv += ["-chardev", f"pipe,id=ex{n},path={root / f'exec{n}'}"]
            argv += ["-device", f"virtserialport,chardev=ex{n},name={name}"]
        argv += ["-qmp", f"unix:{root / 'qmp.sock'},server=on,wait=off"]
        argv += ["-netdev", "user,id=n0,host=10.0.2.254,restrict=on"]
        argv += ["-device", "virtio-net-pci,netdev=n0,romfile="]
        self.start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def wait_for(self, marker: str, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists() and marker in self.log.read_text(errors="replace"):
                return time.monotonic() - self.start
            assert self.proc.poll() is None, f"QEMU exited: {self.log.read_text()[-2000:]}"
            time.sleep(0.05)
        raise AssertionError(f"no {marker} in {timeout} s: {self.log.read_text()[-2000:]}")

    def port(self) -> Port:
        return Port(ExecChannel.for_instance(self.root, "t"))

    def qmp(self, command: str) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.root / "qmp.sock"))
            f = sock.makefile("rwb")
            assert b"QMP" in f.readline()
            for cmd in ("qmp_capabilities", command):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while b"return" not in f.readline():
                    pass

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def boot(qemu_bin: Path, image_cache: Path, tmp_path: Path, workspace: Path) -> Iterator[object]:
    guests: list[Guest] = []

    def start(agents: tuple[str, ...] = ()) -> Guest:
        manifest = images.load_manifest(micro.build_micro(agents))
        guests.append(Guest(qemu_bin, manifest, tmp_path, workspace))
        return guests[-1]

    yield start
    for g in guests:
        g.close()


@pytest.mark.qemu
def test_micro_guest_keeps_the_contract(boot: Callable[[], Guest], workspace: Path) -> None:
    guest = boot()
    ready = guest.wait_for(contract.ready_marker())
    assert "VMCTL-BOOTED" in guest.log.read_text()
    port = guest.port()
    out, status = port.run(
        "id -un; pwd; echo $OPENAI_API_KEY; stat -c '%a %U' "
        "/home/agent/.config/opencode/opencode.json /etc/vmctl/env;"
        "cat /home/agent/.config/opencode/opencode.json; grep ' /workspace ' /proc/mounts"
    )
    lines = out.decode().splitlines()
    assert status == 0, out
    assert lines[:6] == [
        "agent",
        "/workspace",
        "k $x",
        "644 agent",
        "600 agent",  # the env file (which may hold a key): the agent's alone
        '{"model": "llama/test"}',
    ]
    assert "nosuid" in lines[6] and "nodev" in lines[6]
    made = "echo made by the guest > /workspace/note; chmod 4755 /workspace/note 2>/dev/null; true"
    assert port.run(made) == (b"", 0)
    note = workspace / "note"
    assert note.read_text() == "made by the guest\n"
    assert note.stat().st_uid == os.getuid() and note.stat().st_mode & 0o7777 == 0o644
    assert port.run("echo failing >&2; false") == (b"failing\n", 1)
    assert port.run("ip -4 addr show eth0 | grep -o 'inet [0-9./]*'") == (b"inet 10.0.2.15/24\n", 0)
    times = []
    for _ in range(10):
        t = time.monotonic()
        assert port.run("true") == (b"", 0)
        times.append(time.monotonic() - t)
    print(f"ready={ready:.2f}s exec_true_median={sorted(times)[5] * 1000:.0f}ms")
    guest.qmp("system_powerdown")
    guest.wait_for(contract.raw()["console"]["poweroff_marker"], timeout=30)
    assert guest.proc.wait(30) == 0


@pytest.mark.qemu
@pytest.mark.slow
def test_opencode_runs_in_the_micro_guest(boot: Callable[..., Guest]) -> None:
    guest = boot(("opencode",))
    guest.wait_for(contract.ready_marker())
    out, status = guest.port().run("opencode --version; rg --version | head -1", timeout=240)
    assert status == 0, out
    assert out.decode().splitlines()[:2] == [micro.OPENCODE_VERSION, "ripgrep 13.0.0"]


def test_a_kernel_with_everything_built_in_loads_no_module() -> None:
    """The guest kernel (data/guest/kernel.config) builds every driver in: no modprobe at all."""
    text = micro.render_init([], ())
    assert "modprobe -a" not in text
    subprocess.run(["busybox", "sh", "-n", "-c", text], check=True)
    config = micro_kernel.guest_config()
    for driver in ("CONFIG_PVH=y", "CONFIG_9P_FS=y", "CONFIG_VIRTIO_FS=y", "CONFIG_FW_CFG_SYSFS=y"):
        assert driver in config.splitlines()


def test_a_kernel_config_request_kconfig_dropped_or_turned_back_on_is_named() -> None:
    wanted = "CONFIG_9P_FS=y\n# CONFIG_LEGACY_PTYS is not set\n# CONFIG_VT is not set\n"
    kept = "CONFIG_9P_FS=y\n# CONFIG_LEGACY_PTYS is not set\n"  # VT absent: off too
    assert micro_kernel.config_misses(wanted, kept) == []
    got = "CONFIG_LEGACY_PTYS=y\nCONFIG_LEGACY_PTY_COUNT=256\n"
    assert micro_kernel.config_misses(wanted, got) == [
        "CONFIG_9P_FS",
        "CONFIG_LEGACY_PTYS (meant off)",
    ]
    shipped = micro_kernel.guest_config()
    assert "# CONFIG_LEGACY_PTYS is not set" in shipped.splitlines()
