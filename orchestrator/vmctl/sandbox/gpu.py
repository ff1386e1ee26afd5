"""Which GPU a sandboxed program needs, read from the program and the host.

A llama-server built for CUDA, Vulkan or ROCm names its GPU runtime among
its ELF `DT_NEEDED` libraries; that is what `vmctl serve` uses by default
(`--gpu` forces, `--no-gpu` refuses). The devices and driver files each
kind needs are data in the host profile (`[gpu.KIND]` tables); this module
only decides which kinds apply. Reading the ELF here (a few hundred bytes
of headers) avoids running `ldd`, which may execute the binary's loader.
"""

from __future__ import annotations

import struct
from pathlib import Path

#: GPU kinds a host profile can grant, and the libraries that reveal them.
KINDS: dict[str, tuple[str, ...]] = {
    "nvidia": ("libcuda.so", "libcudart.so", "libcublas.so"),
    "rocm": ("libamdhip64.so", "libhipblas.so", "librocblas.so"),
    "vulkan": ("libvulkan.so",),
}
#: Device nodes whose presence means the host has that kind of GPU.
HOST_MARKERS: dict[str, str] = {
    "nvidia": "/dev/nvidiactl",
    "rocm": "/dev/kfd",
    "vulkan": "/dev/dri",
}
_MAX_HEADER = 1 << 20
DT_NEEDED, DT_STRTAB, PT_DYNAMIC, PT_LOAD = 1, 5, 2, 1


def needed_libraries(binary: Path) -> list[str]:
    """The `DT_NEEDED` names of a 64-bit little-endian ELF, or [] for anything else."""
    try:
        data = binary.read_bytes()
    except OSError:
        return []
    if data[:6] != b"\x7fELF\x02\x01" or len(data) < 64:
        return []
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", data, 0x20)[0],
        *struct.unpack_from("<HH", data, 0x36),
    )
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    for i in range(min(phnum, 256)):
        off = phoff + i * phentsize
        if off + 56 > len(data):
            return []
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", data, off)
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []
    entries: list[tuple[int, int]] = []
    for off in range(dynamic[0], min(dynamic[0] + dynamic[1], len(data) - 15), 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        entries.append((tag, val))
    strtab = next((v for t, v in entries if t == DT_STRTAB), None)
    base = next(
        (o + strtab - v for v, o, s in loads if strtab is not None and v <= strtab < v + s), None
    )
    if base is None:
        return []
    names = []
    for tag, val in entries:
        if tag == DT_NEEDED and base + val < len(data):
            end = data.find(b"\x00", base + val, base + val + 4096)
            if end > 0:
                names.append(data[base + val : end].decode("ascii", "replace"))
    return names


def kinds_of(binary: Path) -> tuple[str, ...]:
    """The GPU kinds `binary` was built for (empty for a CPU build)."""
    needed = needed_libraries(binary)
    return tuple(
        kind
        for kind, libs in KINDS.items()
        if any(n.startswith(lib) for n in needed for lib in libs)
    )


def host_kinds() -> tuple[str, ...]:
    """The GPU kinds whose device nodes exist on this host."""
    return tuple(kind for kind, node in HOST_MARKERS.items() if Path(node).exists())


def choose(binary: Path, gpu: bool | None) -> tuple[str, ...]:
    """The kinds to grant: the build's by default, the host's with `--gpu`, none with `--no-gpu`.

    A CPU build asked for `--gpu` gets every kind the host has: the user may
    know better (a build that loads its backend with dlopen shows no
    `DT_NEEDED`); an unusable grant costs nothing but device visibility.
    """
    if gpu is False:
        return ()
    built = kinds_of(binary)
    if gpu is None:
        return built
    return built or host_kinds()
