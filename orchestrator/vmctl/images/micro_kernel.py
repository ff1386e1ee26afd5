"""The micro guest's kernel: built for the guest, or Debian's generic one trimmed.

By default (`VMCTL_MICRO_KERNEL=guest`) Debian's `linux-source-X.Y` is
fetched with `apt-get download` and built once from `make tinyconfig` plus
data/guest/kernel.config, every driver built in: under TCG the generic
kernel spent ~1.3 s in initcalls for hardware no guest has and ~0.3 s
loading modules (bench/boot.py: raw boot 2.25 s -> 1.26 s). A build takes
about 4 minutes on 2 cores and needs `make`, a C compiler, flex, bison, bc
and libelf.

`VMCTL_MICRO_KERNEL=debian` takes Debian's `linux-image-*-amd64` instead
(never `-cloud-`, which lacks 9p): its uncompressed `vmlinux` is cut out of
the bzImage (PVH boot skips the ~3.5 s decompressor under TCG), and only
the modules the guest contract needs are kept, in depmod's dependency order.
Both are cached under `paths.kernels_dir()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vmctl import contract, paths, ui
from vmctl.errors import VMError

#: What the guest loads at boot: 9p (the workspace's portable transport and
#: every read-only share), virtio transport, net, serial ports, fw_cfg, and
#: the ACPI power button with evdev (QMP system_powerdown).
MODULES = (
    "virtio_pci",
    "virtio_net",
    "virtio_console",
    *contract.transports()["9p"].modules,
    "qemu_fw_cfg",
    "button",
    "evdev",
)
#: Loaded only when the workspace comes over virtio-fs (vmctl.workspace=virtiofs).
ON_DEMAND = contract.transports()["virtiofs"].modules
_XZ_MAGIC = b"\xfd7zXZ\x00"
_DONE = ".complete"


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel: vmlinux and the modules to insmod, in order."""

    package: str
    version: str
    root: Path

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def release(self) -> str:
        """`uname -r` of this kernel: where modprobe looks under /lib/modules."""
        return self.package.removeprefix("linux-image-")

    @property
    def modules_dir(self) -> Path:
        return self.root / "modules"

    def load_order(self) -> list[str]:
        """Module paths relative to `modules_dir`, dependencies first."""
        return (self.root / "load-order").read_text().split()


def run(argv: list[str], what: str, hint: str, cwd: Path | None = None) -> str:
    """Run a build tool; a failure is a VMError naming the tool."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
    except FileNotFoundError:
        raise VMError(f"{argv[0]} not found ({what})", hint) from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise VMError(
            f"{what} failed: {argv[0]} exited {proc.returncode}", hint, details="\n".join(tail)
        )
    return proc.stdout


def find_package() -> tuple[str, str]:
    """(package, version) of the generic kernel Debian points at, newest if no meta package."""
    hint = "vmctl's micro image needs Debian's apt (apt-get update may help)"
    deps = run(["apt-cache", "depends", "linux-image-amd64"], "apt-cache", hint)
    names = re.findall(r"Depends: (linux-image-\S+-amd64)\b", deps)
    if not names:
        found = run(["apt-cache", "search", "--names-only", r"^linux-image-.*-amd64$"], "apt", hint)
        names = [
            line.split()[0]
            for line in found.splitlines()
            if line and not re.search(r"-(cloud|rt)-amd64|-dbg|-unsigned", line.split()[0])
        ]
    versions: list[tuple[str, str]] = []
    for name in names:
        shown = run(["apt-cache", "show", "--no-all-versions", name], "apt-cache", hint)
        m = re.search(r"^Version: (\S+)", shown, re.M)
        if m and "-cloud-" not in name:
            versions.append((name, m.group(1)))
    if not versions:
        raise VMError("no Debian generic kernel package (linux-image-*-amd64) found", hint)
    versions.sort(key=lambda nv: _version_key(nv[1]))
    return versions[-1]


def _version_key(version: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.+~:-]", version)]


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (an XZ stream)."""
    start = bzimage.find(_XZ_MAGIC)
    while start >= 0:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
        except lzma.LZMAError:
            elf = b""
        if elf[:4] == b"\x7fELF":
            return elf
        start = bzimage.find(_XZ_MAGIC, start + 1)
    raise VMError(
        "no XZ-compressed ELF kernel inside the bzImage", "the kernel package is not an XZ build"
    )


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {name: (path, [dependency paths])}, names with '_' not '-'."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[module_name(path)] = (path, rest.split())
    return deps


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base).replace("-", "_")


def load_order(deps: dict[str, tuple[str, list[str]]], wanted: tuple[str, ...]) -> list[str]:
    """Paths of `wanted` and their dependencies, each after what it needs."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in deps:
            raise VMError(
                f"kernel module {name} not found", "the kernel package lacks it (-cloud-?)"
            )
        path, needs = deps[name]
        for dep in needs:
            visit(module_name(dep))
        order.append(path)

    for name in wanted:
        visit(name)
    return order


def _copy_module(mods: Path, rel: str, into: Path) -> str:
    """Copy one module decompressed (busybox insmod reads plain .ko); its new path."""
    src = mods / rel
    data = src.read_bytes()
    if src.suffix == ".xz":
        data, rel = lzma.decompress(data), rel.removesuffix(".xz")
    elif src.suffix in (".zst", ".gz"):
        tool = "zstd" if src.suffix == ".zst" else "gzip"
        data = subprocess.run([tool, "-dc", str(src)], capture_output=True, check=True).stdout
        rel = rel.removesuffix(src.suffix)
    dest = into / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return rel


def _only(folder: Path, pattern: str, package: str) -> Path:
    """The one file `pattern` names in `folder`, or a VMError about the package's layout."""
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise VMError(f"{package}: expected one {pattern} in {folder.name}, found {len(found)}")
    return found[0]


def _unpack_deb(package: str, version: str, work: Path, hint: str) -> None:
    """`apt-get download` one package into `work` and unpack it into `work/x`."""
    run(["apt-get", "download", f"{package}={version}"], "apt-get download", hint, cwd=work)
    deb = _only(work, "*.deb", package)
    run(["dpkg-deb", "-x", str(deb), str(work / "x")], "dpkg-deb", hint)


def fetch_kernel(package: str, version: str) -> Kernel:
    """Download, unpack and trim the kernel package once; reuse it afterwards."""
    kernel = Kernel(package, version, paths.kernels_dir() / f"{package}_{version}")
    done = f"{package} {version} {' '.join(MODULES + ON_DEMAND)}\n"
    with contextlib.suppress(OSError):
        if (kernel.root / _DONE).read_text() == done:
            return kernel
    hint = "install the Debian tools: apt-get install kmod dpkg apt"
    with ui.step(f"fetching {package} {version}"), tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _unpack_deb(package, version, work, hint)
        release = package.removeprefix("linux-image-")
        run(["depmod", "-b", str(work / "x"), release], "depmod (package kmod)", hint)
        mods = work / "x" / "lib" / "modules" / release
        deps = parse_modules_dep((mods / "modules.dep").read_text())
        order = load_order(deps, MODULES + ON_DEMAND)
        if kernel.root.exists():
            shutil.rmtree(kernel.root)
        (kernel.modules_dir).mkdir(parents=True)
        plain = [_copy_module(mods, rel, kernel.modules_dir) for rel in order]
        (kernel.root / "load-order").write_text("\n".join(plain) + "\n")
        bzimage = (work / "x" / "boot" / f"vmlinuz-{release}").read_bytes()
        kernel.vmlinux.write_bytes(extract_vmlinux(bzimage))
        (kernel.root / _DONE).write_text(done)
    return kernel


KINDS = ("guest", "debian")
CONFIG_RE = re.compile(r"^(CONFIG_[A-Z0-9_]+)=(\S+)$", re.M)
OFF_RE = re.compile(r"^# (CONFIG_[A-Z0-9_]+) is not set$", re.M)
_BUILD_HINT = (
    "apt-get install build-essential flex bison bc libelf-dev (or VMCTL_MICRO_KERNEL=debian)"
)


def kind() -> str:
    """Which kernel the micro image boots: VMCTL_MICRO_KERNEL, `guest` unless said."""
    chosen = os.environ.get("VMCTL_MICRO_KERNEL") or "guest"
    if chosen not in KINDS:
        raise VMError(f"VMCTL_MICRO_KERNEL={chosen!r} is not one of {', '.join(KINDS)}")
    return chosen


def config_misses(wanted: str, got: str) -> list[str]:
    """What of `wanted` (kernel.config) the final .config `got` did not keep.

    Kconfig drops a request silently when a dependency is missing, and
    turns an option back on when something selects it: both are named.
    """
    have = dict(CONFIG_RE.findall(got))
    lost = [k for k, v in CONFIG_RE.findall(wanted) if have.get(k) != v]
    return lost + [f"{k} (meant off)" for k in OFF_RE.findall(wanted) if k in have]


def guest_config() -> str:
    return paths.data_text("guest/kernel.config")


def kernel_inputs() -> list[object]:
    """What names the kernel in the image's key (and its folder under kernels_dir)."""
    package, version = find_package()
    if kind() == "debian":
        return [package, version, [*MODULES, *ON_DEMAND]]
    source = find_source(package)
    key = hashlib.sha256(guest_config().encode()).hexdigest()[:12]
    return [source[0], f"{source[1]}_{key}", "built"]


def find_source(image_package: str) -> tuple[str, str]:
    """(package, version) of the kernel source matching the generic image's X.Y."""
    m = re.match(r"linux-image-(\d+\.\d+)", image_package)
    if not m:
        raise VMError(f"cannot tell the kernel series of {image_package}")
    source = f"linux-source-{m.group(1)}"
    shown = run(["apt-cache", "show", "--no-all-versions", source], "apt-cache", _BUILD_HINT)
    found = re.search(r"^Version: (\S+)", shown, re.M)
    if not found:
        raise VMError(f"no {source} package to build the guest kernel from", _BUILD_HINT)
    return source, found.group(1)


def get_kernel(inputs: list[object]) -> Kernel:
    """The kernel `kernel_inputs` named: fetched and trimmed, or built, once."""
    package, version = str(inputs[0]), str(inputs[1])
    if inputs[2] == "built":
        return build_kernel(package, version)
    return fetch_kernel(package, version)


def build_kernel(source: str, keyed_version: str) -> Kernel:
    """Build vmlinux from `source` with tinyconfig plus kernel.config; reuse it afterwards."""
    kernel = Kernel(source, keyed_version, paths.kernels_dir() / f"{source}_{keyed_version}")
    config = guest_config()
    done = f"{source} {keyed_version}\n"
    with contextlib.suppress(OSError):
        if (kernel.root / _DONE).read_text() == done:
            return kernel
    version = keyed_version.rsplit("_", 1)[0]
    step = f"building the guest kernel from {source} {version} (once; ~4 min on 2 cores)"
    with ui.step(step), tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _unpack_deb(source, version, work, _BUILD_HINT)
        tarball = _only(work / "x" / "usr" / "src", "linux-source-*.tar.*", source)
        run(["tar", "xf", str(tarball), "-C", str(work)], "tar", _BUILD_HINT)
        src = _only(work, "linux-source-*/", source)
        run(["make", "-s", "tinyconfig"], "make tinyconfig", _BUILD_HINT, src)
        (src / "vmctl.config").write_text(config)
        merge = ["scripts/kconfig/merge_config.sh", "-m", ".config", "vmctl.config"]
        run(merge, "merging kernel.config", _BUILD_HINT, src)
        run(["make", "-s", "olddefconfig"], "make olddefconfig", _BUILD_HINT, src)
        lost = config_misses(config, (src / ".config").read_text())
        if lost:
            raise VMError(f"the guest kernel's config lost {', '.join(lost)}", "fix kernel.config")
        jobs = f"-j{os.cpu_count() or 1}"
        run(["make", "-s", jobs, "vmlinux"], "building the guest kernel", _BUILD_HINT, src)
        if kernel.root.exists():
            shutil.rmtree(kernel.root)
        kernel.modules_dir.mkdir(parents=True)
        shutil.copyfile(src / "vmlinux", kernel.vmlinux)
        (kernel.root / "load-order").write_text("")
        (kernel.root / _DONE).write_text(done)
    return kernel
