"""The micro guest's kernel: Debian's generic kernel, unpacked and trimmed.

Debian's `linux-image-*-amd64` (never `-cloud-`, which lacks 9p) is fetched
with `apt-get download`, its uncompressed `vmlinux` is cut out of the
bzImage (PVH boot skips the ~3.5 s decompressor under TCG), and only the
modules the guest contract needs are kept, in depmod's dependency order.
Cached under `paths.kernels_dir()/<package>_<version>/`.
"""

from __future__ import annotations

import contextlib
import lzma
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
        run(["apt-get", "download", f"{package}={version}"], "apt-get download", hint, cwd=work)
        deb = next(work.glob("*.deb"))
        run(["dpkg-deb", "-x", str(deb), str(work / "x")], "dpkg-deb", hint)
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
