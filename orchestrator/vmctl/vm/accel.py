"""Choosing the accelerator: hvf on macOS, kvm only where it really works, else tcg.

`/dev/kvm` existing proves nothing: on nested hosts it opens fine and QEMU
then dies at once ("failed to set MSR 0x10a"), or, on hosts whose KVM is
itself emulated (kvm-pvm), firmware runs but a Linux kernel stalls in an
"emulation failure". So `auto` boots the guest's own kernel under
`-accel kvm` with no root filesystem and keeps kvm only if that kernel
reaches its expected panic within a few seconds (without a kernel: only
that an empty QEMU survives a moment).
The verdict is cached per boot (boot id + QEMU binary) so the probe costs
once, not on every `vmctl up`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vmctl import paths, procs
from vmctl.errors import ConfigError, VMError

ACCELS = ("auto", "kvm", "hvf", "tcg")
PROBE_SURVIVE_S = 1.0
#: A kernel with no root must reach its panic this fast under working KVM.
PROBE_KERNEL_S = 8.0
#: Bumped when the probe changes, so an older cached verdict is not trusted.
PROBE_VERSION = 2


@dataclass(frozen=True)
class Accel:
    """The accelerator QEMU runs under, with the CPU and machine that suit it."""

    name: str  # kvm | hvf | tcg
    cpu: str  # host under kvm/hvf; max under tcg (opencode needs AVX)
    machine: str  # q35 (x86_64) | virt (aarch64)
    arch: str  # x86_64 | aarch64
    #: Why `auto` fell back to tcg (shown as a warning), or None.
    reason: str | None = None


def host_arch() -> str:
    m = platform.machine().lower()
    return "aarch64" if m in ("arm64", "aarch64") else "x86_64"


def qemu_binary(arch: str | None = None) -> str:
    """Absolute path of qemu-system-ARCH; a one-line error naming the package."""
    arch = arch or host_arch()
    found = shutil.which(f"qemu-system-{arch}")
    if not found:
        pkg = "qemu-system-x86" if arch == "x86_64" else "qemu-system-arm"
        hint = "brew install qemu" if sys.platform == "darwin" else f"apt-get install {pkg}"
        raise VMError(f"qemu-system-{arch} not found on PATH", hint)
    return found


def _make(name: str, arch: str, reason: str | None = None) -> Accel:
    cpu = "max" if name == "tcg" else "host"
    machine = "virt" if arch == "aarch64" else "q35"
    return Accel(name, cpu, machine, arch, reason)


def _cache_file(qemu: str, kernel: Path | None) -> Path:
    boot = procs.boot_id()
    st = os.stat(qemu)
    key = f"{PROBE_VERSION}\0{boot}\0{qemu}\0{st.st_mtime_ns}\0{st.st_size}\0{kernel}"
    key = hashlib.sha256(key.encode()).hexdigest()
    return paths.accel_dir() / f"kvm-{key[:24]}.json"


def probe_kernel(qemu: str, machine: str, kernel: Path) -> str | None:
    """Boot `kernel` under KVM with no root: None once it panics as expected, else why not."""
    argv = [qemu, "-M", machine, "-accel", "kvm", "-cpu", "host", "-nodefaults", "-no-reboot"]
    argv += ["-display", "none", "-m", "256", "-monitor", "none", "-serial", "stdio"]
    argv += ["-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 loglevel=1"]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
        try:
            proc.wait(PROBE_KERNEL_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        out.seek(0)
        text = out.read(1 << 20).decode(errors="replace")
    if "Kernel panic" in text:
        return None
    for line in text.splitlines():
        if "KVM" in line or "error" in line.lower():
            return line.strip().replace(qemu, "qemu")
    return f"a test kernel made no progress under KVM in {PROBE_KERNEL_S:.0f} s"


def probe_kvm(qemu: str, arch: str, kernel: Path | None = None) -> str | None:
    """None if KVM really works with this QEMU (and boots `kernel`), else the reason."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    machine = "virt" if arch == "aarch64" else "q35"
    if kernel is not None:
        return probe_kernel(qemu, machine, kernel)
    argv = [qemu, "-M", machine, "-accel", "kvm", "-cpu", "host", "-nodefaults"]
    argv += ["-display", "none", "-m", "64", "-serial", "none", "-monitor", "none"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        try:
            rc = proc.wait(PROBE_SURVIVE_S)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        if rc is None:
            return None
        log.seek(0)
        lines = [ln for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
    detail = lines[0] if lines else f"exited with status {rc}"
    return detail.replace(qemu, "qemu")


def kvm_problem(qemu: str, arch: str, kernel: Path | None = None) -> str | None:
    """`probe_kvm`, cached per boot, QEMU binary and kernel."""
    cache = _cache_file(qemu, kernel)
    try:
        data = json.loads(cache.read_text())
        if isinstance(data, dict) and "problem" in data:
            cached = data["problem"]
            return cached if isinstance(cached, str) else None
    except (OSError, ValueError):
        pass
    problem = probe_kvm(qemu, arch, kernel)
    paths.private_dir(cache.parent)
    cache.write_text(json.dumps({"problem": problem, "time": time.time()}) + "\n")
    paths.keep_newest(cache.parent, "kvm-*.json", KEEP_VERDICTS)
    return problem


#: Verdicts kept: one per kernel in use is all a boot needs; older boots',
#: older QEMUs' and dropped images' go, so the folder stays bounded.
KEEP_VERDICTS = 8


def check_name(requested: str) -> None:
    """A bad `--accel` in one line, before any image or probe work."""
    if requested not in ACCELS:
        raise ConfigError(f"--accel {requested!r} is not one of {', '.join(ACCELS)}")


def choose(requested: str, qemu: str, arch: str | None = None, kernel: Path | None = None) -> Accel:
    """Resolve `--accel` to a working accelerator, or fail in one line.

    `kernel` (the guest's) makes the KVM probe boot it: the only proof that
    counts on hosts where KVM starts but cannot run Linux.
    """
    arch = arch or host_arch()
    check_name(requested)
    if requested == "tcg":
        return _make("tcg", arch)
    if requested == "hvf" or (requested == "auto" and sys.platform == "darwin"):
        if sys.platform != "darwin":
            raise ConfigError("--accel hvf needs macOS", "use --accel auto")
        return _make("hvf", arch)
    if not sys.platform.startswith("linux"):
        if requested == "kvm":
            raise ConfigError("--accel kvm needs Linux", "use --accel auto")
        return _make("tcg", arch, "no hardware accelerator on this platform; using TCG (slow)")
    problem = kvm_problem(qemu, arch, kernel)
    if problem is None:
        return _make("kvm", arch)
    if requested == "kvm":
        raise VMError(f"KVM unusable: {problem}", "use --accel auto or --accel tcg")
    return _make("tcg", arch, f"KVM unusable: {problem}; using TCG (slow)")
