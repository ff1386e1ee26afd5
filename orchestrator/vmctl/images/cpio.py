"""A newc cpio writer for initramfs images, in Python so owners are exact.

The `cpio` tool takes owners and modes from the build machine; here every
entry states its own (root unless said otherwise), so the image is the
same wherever it is built and nothing of the builder leaks in.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import BinaryIO


@dataclass
class Archive:
    """Entries in the order they are added; parents are added on demand."""

    entries: dict[str, tuple[int, int, int, bytes, int]] = field(default_factory=dict)

    def _parents(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self.entries:
                self.entries[parent] = (stat.S_IFDIR | 0o755, 0, 0, b"", 0)

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (stat.S_IFDIR | mode, uid, gid, b"", 0)

    def file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (stat.S_IFREG | mode, uid, gid, data, 0)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (stat.S_IFLNK | 0o777, 0, 0, target.encode(), 0)

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (stat.S_IFCHR | mode, 0, 0, b"", (major << 8) | minor)

    def write(self, out: BinaryIO) -> None:
        """Write the archive (newc, mtime 0, so equal inputs give equal bytes)."""
        ino = 1
        for name, (mode, uid, gid, data, rdev) in self.entries.items():
            _entry(out, name, ino, mode, uid, gid, data, rdev)
            ino += 1
        _entry(out, "TRAILER!!!", 0, 0, 0, 0, b"", 0)
        # Pad to 512 bytes, as the kernel's own initramfs does.
        pos = out.tell()
        if pos % 512:
            out.write(b"\0" * (512 - pos % 512))


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _entry(
    out: BinaryIO, name: str, ino: int, mode: int, uid: int, gid: int, data: bytes, rdev: int
) -> None:
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, uid, gid, nlink, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    header += b"%08X" % len(encoded) + b"%08X" % 0
    out.write(header + encoded + _pad(len(header) + len(encoded)))
    out.write(data + _pad(len(data)))
