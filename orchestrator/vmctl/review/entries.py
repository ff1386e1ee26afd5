"""What one path of a tree is, as the guest sees it, read from the host.

The review copy is shared with `security_model=mapped-xattr` (see
vmctl.qemu): what the guest creates is a plain file or folder on the host,
and the guest's view lives in `user.virtfs.*` xattrs. `user.virtfs.mode`
holds the guest's whole st_mode (type and permission bits): a guest
symlink is a regular host file whose content is the target, a device
node an empty file marked S_IFCHR or S_IFBLK, a `chmod +x` only an
xattr. Reading these is the only way to report the agent's mode changes
and symlinks truthfully. Files with no such xattr are seen as they are
on the host.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODE_XATTR = "user.virtfs.mode"
#: A symlink target longer than this is not a symlink any guest made (PATH_MAX).
MAX_LINK = 4096
_CHUNK = 1 << 20

FILE, DIR, LINK, SPECIAL = "file", "dir", "link", "special"


@dataclass(frozen=True)
class Entry:
    """One path: its type, permission bits (setuid etc. included) and content key.

    `key` is the SHA-256 of a file's content, a symlink's target, or "" for
    folders and special files. `ctime_ns`/`ino`/`size` let an unchanged
    file skip rehashing.
    """

    kind: str
    mode: int
    key: str
    size: int = 0
    ctime_ns: int = 0
    ino: int = 0
    special: str = ""

    def to_json(self) -> list[Any]:
        return [self.kind, self.mode, self.key, self.size, self.ctime_ns, self.ino, self.special]

    @classmethod
    def from_json(cls, data: Any) -> Entry:
        if not isinstance(data, list) or len(data) != 7:
            raise ValueError("manifest entry is not a 7-item list")
        kind, mode, key, size, ctime_ns, ino, special = data
        if kind not in (FILE, DIR, LINK, SPECIAL) or not isinstance(key, str):
            raise ValueError(f"bad manifest entry {data!r}")
        return cls(kind, int(mode), key, int(size), int(ctime_ns), int(ino), str(special))

    def same_content(self, other: Entry | None) -> bool:
        return other is not None and (self.kind, self.key) == (other.kind, other.key)


def guest_mode(path: Path, st: os.stat_result) -> int:
    """The st_mode the guest sees: the mapped xattr if present, else the host's."""
    if stat.S_ISLNK(st.st_mode):
        return st.st_mode
    try:
        raw = os.getxattr(path, MODE_XATTR, follow_symlinks=False)
    except OSError:
        return st.st_mode
    if len(raw) not in (4, 8):
        return st.st_mode
    return int.from_bytes(raw[:4], "little")


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def link_target(path: Path, st: os.stat_result) -> str:
    """A real symlink's target, or a mapped one's (the file's content)."""
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(path)
    with path.open("rb") as f:
        return f.read(MAX_LINK).decode("utf-8", "surrogateescape")


def read_entry(path: Path, prev: Entry | None = None) -> Entry | None:
    """The guest's view of `path`, or None if it does not exist.

    With `prev` (the same path's earlier entry), a regular file whose
    ctime, inode and size are unchanged keeps its hash without rereading.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    mode = guest_mode(path, st)
    perms = stat.S_IMODE(mode)
    ident = (st.st_size, st.st_ctime_ns, st.st_ino)
    if stat.S_ISDIR(mode) and stat.S_ISDIR(st.st_mode):
        return Entry(DIR, perms, "", *ident)
    if stat.S_ISLNK(mode):
        return Entry(LINK, perms, link_target(path, st), *ident)
    if stat.S_ISREG(mode) and stat.S_ISREG(st.st_mode):
        same = prev is not None and prev.kind == FILE
        if same and prev is not None and (prev.size, prev.ctime_ns, prev.ino) == ident:
            return Entry(FILE, perms, prev.key, *ident)
        try:
            key = file_hash(path)
        except OSError:  # unreadable to vmctl: compared by size and time only
            key = f"unreadable:{st.st_size}:{st.st_mtime_ns}"
        return Entry(FILE, perms, key, *ident)
    names = {stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}
    names |= {stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}
    return Entry(SPECIAL, perms, "", *ident, special=names.get(stat.S_IFMT(mode), "special file"))


def walk(root: Path) -> Iterator[str]:
    """Every path under `root`, relative, POSIX form, parents before children.

    Symlinked folders are not followed (os.walk's default).
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        base = "" if rel == "." else rel + "/"
        for name in sorted(dirnames) + sorted(filenames):
            yield base + name


def scan(root: Path, prev: dict[str, Entry] | None = None) -> dict[str, Entry]:
    """Every entry under `root` by relative path (hashes reused from `prev` when unchanged)."""
    out: dict[str, Entry] = {}
    old = prev or {}
    for rel in walk(root):
        entry = read_entry(root / rel, old.get(rel))
        if entry is not None:
            out[rel] = entry
    return out
