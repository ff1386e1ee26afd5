"""The workspace's executable bits, carried both ways between host and guest.

The workspace is a 9p share under `security_model=mapped-xattr` (see
vmctl.vm.qemu): a guest `chmod` only rewrites the `user.virtfs.mode` xattr
of the host file (QEMU stores the guest's whole st_mode there, file type
included, as a little-endian 32-bit value), and a guest-made file is a host
0644 file whose guest mode lives in that xattr. So without help a guest
`chmod +x run.sh` leaves the host file unexecutable, and a host `chmod +x`
on a guest-made file stays hidden behind the xattr.

This reconciler, run inside the guest's sidecar (vmctl.sidecars.guestpath),
watches the workspace with inotify and carries ONLY the three x bits (0o111)
of regular files that carry the xattr: never setuid/setgid/sticky, never
anything for folders, symlinks, devices or fifos (those stay xattr-only).
Files without the xattr need nothing: the guest sees their real mode.

Per inode it remembers the x bits last seen on each side, so it knows which
side changed: the xattr's (the guest) -> chmod the host file; the real
mode's (the host) -> rewrite the xattr's x bits. Its own change shows up as
both sides agreeing, so nothing ping-pongs. An inode it has not seen before
takes the guest's bits (a file the guest just made or chmodded for the first
time). At start it only records what is there: `vmctl up` rewrites no mode.
Files are reached through an O_PATH|O_NOFOLLOW descriptor and
/proc/self/fd, so a symlink is never followed. Linux only (inotify via
ctypes; on macOS the x bit stays guest-only).

Bounded: inotify watches (half of fs.inotify.max_user_watches at most, one
log line when the limit is hit; the rest of the tree is then not watched),
remembered inodes (MAX_TRACKED, oldest forgotten first), the work of one
drain (MAX_READS reads) and its error lines (MAX_ERROR_LINES).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import sys
from collections.abc import Callable

XATTR = "user.virtfs.mode"
X_BITS = 0o111
MAX_TRACKED = 100_000
MAX_READS = 64
READ_SIZE = 65536
MAX_ERROR_LINES = 10
#: What `vmctl exec` sends the sidecar (vmctl.vm.execchan.settle) so that the
#: changes its command made are applied before it returns.
SETTLE = b"settle"

IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
MASK = IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
WATCH_FLAGS = MASK | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len
MODE = struct.Struct("<I")


def _log(line: str) -> None:
    print(f"vmctl modes: {line}", file=sys.stderr, flush=True)


def watch_limit() -> int:
    """Half the per-user inotify watch limit: the user's editors need watches too."""
    try:
        with open("/proc/sys/fs/inotify/max_user_watches") as f:
            return max(1, int(f.read()) // 2)
    except (OSError, ValueError):
        return 4096


class Reconciler:
    """One workspace's inotify watches and the x bits last seen on each side."""

    def __init__(self, root: str, limit: int | None = None, log: Callable[[str], None] = _log):
        self.root = os.path.abspath(root)
        self.limit = watch_limit() if limit is None else limit
        self.log = log
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd
        self.dirs: dict[int, str] = {}  # watch descriptor -> folder
        #: (st_dev, st_ino) -> (host x bits, guest x bits) as last seen or set.
        self.seen: dict[tuple[int, int], tuple[int, int]] = {}
        self.full = False
        self.applied = 0  # changes carried, either way (for tests and the log)
        self.errors = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ---- watching ----
    def _watch(self, folder: str) -> bool:
        if len(self.dirs) >= self.limit:
            wd, err = -1, errno.ENOSPC
        else:
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), WATCH_FLAGS)
            err = ctypes.get_errno() if wd < 0 else 0
        if wd >= 0:
            self.dirs[wd] = folder
            return True
        if err == errno.ENOSPC and not self.full:
            self.full = True
            self.log(
                f"inotify watch limit reached ({len(self.dirs)} folders): x bits in further"
                " folders are not carried (raise fs.inotify.max_user_watches)"
            )
        return False

    def scan(self, top: str | None = None, initial: bool = False) -> None:
        """Watch `top` (default: the root) and every folder below; check each file."""
        stack = [self.root if top is None else top]
        while stack:
            folder = stack.pop()
            if not self._watch(folder):
                continue
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        self.check(entry.path, initial)
                except OSError:
                    continue

    def _unwatch(self, folder: str) -> None:
        """A folder moved away: unwatch it and all below (watched anew if it lands here)."""
        for wd, path in list(self.dirs.items()):
            if path == folder or path.startswith(folder + "/"):
                self._libc.inotify_rm_watch(self.fd, wd)
                del self.dirs[wd]

    # ---- events ----
    def drain(self) -> None:
        """Apply every pending event (at most MAX_READS reads: the loop calls again)."""
        for _ in range(MAX_READS):
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                return
            off = 0
            while off + EVENT.size <= len(data):
                wd, mask, _, n = EVENT.unpack_from(data, off)
                name = os.fsdecode(data[off + EVENT.size : off + EVENT.size + n].rstrip(b"\0"))
                off += EVENT.size + n
                self._event(wd, mask, name)

    def _event(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self.log("inotify queue overflowed: rescanning the workspace")
            self.scan()
            return
        if mask & IN_IGNORED:
            self.dirs.pop(wd, None)
            return
        folder = self.dirs.get(wd)
        if folder is None or not name:
            return
        path = os.path.join(folder, name)
        if mask & IN_ISDIR:
            if mask & IN_MOVED_FROM:
                self._unwatch(path)
            elif mask & (IN_CREATE | IN_MOVED_TO):
                self.scan(path)  # files made before the watch was in place
        elif mask & (IN_ATTRIB | IN_CREATE | IN_MOVED_TO):
            self.check(path)

    # ---- one file ----
    def check(self, path: str, initial: bool = False) -> None:
        """Reconcile one file's x bits; regular files with a regular-file mode xattr only."""
        try:
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        try:
            self._check(fd, initial)
        except OSError as e:
            self.errors += 1
            if self.errors <= MAX_ERROR_LINES:
                more = " (further errors are not logged)" if self.errors == MAX_ERROR_LINES else ""
                self.log(f"cannot carry the x bit of {path!r}: {e.strerror}{more}")
        finally:
            os.close(fd)

    def _check(self, fd: int, initial: bool) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        key = (st.st_dev, st.st_ino)
        via = f"/proc/self/fd/{fd}"  # the file itself: an O_PATH fd follows nothing
        try:
            raw = os.getxattr(via, XATTR)
        except OSError:
            self.seen.pop(key, None)  # no xattr: the guest sees the real mode
            return
        if len(raw) != MODE.size or not stat.S_ISREG(guest := MODE.unpack(raw)[0]):
            self.seen.pop(key, None)
            return
        host_x, guest_x = st.st_mode & X_BITS, guest & X_BITS
        last = self.seen.get(key)
        if not initial and host_x != guest_x:
            if last is None or guest_x != last[1]:  # the guest changed (or is new): to the host
                os.chmod(via, (stat.S_IMODE(st.st_mode) & ~X_BITS) | guest_x)
                host_x = guest_x
                self.applied += 1
            elif host_x != last[0]:  # the host changed: into the xattr
                os.setxattr(via, XATTR, MODE.pack((guest & ~X_BITS) | host_x))
                guest_x = host_x
                self.applied += 1
        self._remember(key, (host_x, guest_x))

    def _remember(self, key: tuple[int, int], bits: tuple[int, int]) -> None:
        self.seen.pop(key, None)  # re-inserted last: the oldest go first
        self.seen[key] = bits
        while len(self.seen) > MAX_TRACKED:
            del self.seen[next(iter(self.seen))]


def start(root: str, add_reader: Callable[[int, Callable[[], None]], object]) -> Reconciler | None:
    """A reconciler for `root` fed by an event loop's `add_reader`; None where there is none.

    The caller runs `scan(initial=True)` once its own start-up is done.
    """
    if not root or not sys.platform.startswith("linux"):
        return None
    try:
        rec = Reconciler(root)
    except (OSError, AttributeError) as e:
        _log(f"x bits are not carried between host and guest: {e}")
        return None
    add_reader(rec.fd, rec.drain)
    return rec
