"""The workspace over virtio-fs: QEMU's virtiofsd, unprivileged and filtered.

9p makes every lookup, stat and read a round trip through QEMU's single
9p thread; virtio-fs lets the guest kernel cache metadata and pages and
serves requests from a separate daemon (bench/share.py: 3-11x on a 10k-file
tree). The daemon writes the user's folder for a hostile guest, so it is
confined three ways before it execs (docs/guest-contract.md, "The
transport"):

- a user namespace mapping only the invoking uid/gid to the agent's
  (`unshare --user --map-user --map-group --keep-caps`): it can make no
  device node and give no file a foreign owner, and its capabilities reach
  only the user's own files;
- its own sandbox (`-o sandbox=namespace`: mount, pid and net namespaces,
  pivot_root into the folder), so no path the guest names leads outside;
- a seccomp filter (vmctl.sandbox.seccomp) refusing fifos, sockets and
  setuid/setgid/sticky bits; xattrs stay off (`no_xattr`, the default).

vmctl binds the vhost-user socket itself and hands the daemon the
listening fd (`--fd`), so the daemon needs no pid file under /run and QEMU
can connect the moment it starts.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from vmctl import contract, paths
from vmctl.errors import ConfigError, VMError
from vmctl.procs import ProcessRef, die_with_parent, hold
from vmctl.vm import idmap
from vmctl.vm.idmap import IdMap

#: Where distributions put QEMU's C virtiofsd (Debian/Ubuntu; Fedora, Arch).
DAEMONS = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")
SHARES = ("auto", "9p", "virtiofs")
FIX_9P = "use --share 9p (the portable transport)"


def find_daemon() -> Path | None:
    """QEMU's C virtiofsd ($VMCTL_VIRTIOFSD first), or None."""
    listed = os.environ.get("VMCTL_VIRTIOFSD")
    for cand in (listed, *DAEMONS, shutil.which("virtiofsd")):
        if cand and os.access(cand, os.X_OK) and Path(cand).is_file():
            return Path(cand)
    return None


def is_c_daemon(daemon: Path) -> bool:
    """QEMU's C daemon takes `-o source=`; the Rust one (`--shared-dir`) is not wired yet.

    Read from the binary's own help text, not by running it: the C daemon
    drops supplementary groups first thing, and exits where it cannot.
    """
    try:
        with open(daemon, "rb") as f:
            return b"-o source=PATH" in f.read(1 << 24)
    except OSError:
        return False


def unsupported(ids: IdMap, transports: tuple[str, ...]) -> tuple[str, str] | None:
    """(why, fix) when this host or image cannot serve the workspace over virtio-fs."""
    if not sys.platform.startswith("linux"):
        return "virtio-fs needs Linux (QEMU on macOS has no vhost-user)", FIX_9P
    if "virtiofs" not in transports:
        why = "the image's guest cannot mount virtio-fs"
        return why, f"rebuild it (vmctl image build) or {FIX_9P}"
    from vmctl.sandbox import seccomp  # ctypes: imported only when virtio-fs is asked for

    if not seccomp.supported():
        return "virtio-fs is confined with seccomp only on x86_64 and aarch64", FIX_9P
    if ids.how != "userns":
        return "virtio-fs needs user namespaces to confine its daemon", FIX_9P
    daemon = find_daemon()
    if daemon is None:
        return "virtiofsd is not installed", f"install QEMU's virtiofsd, or {FIX_9P}"
    if not is_c_daemon(daemon):
        return f"{daemon} is not QEMU's C virtiofsd", f"set VMCTL_VIRTIOFSD to it, or {FIX_9P}"
    return None


def requested(share: str, review: bool = False) -> str:
    """The transport `--share` names (`auto`: the contract's default), or a one-line refusal."""
    if share not in SHARES:
        raise ConfigError(f"--share {share!r} is not one of {', '.join(SHARES)}")
    chosen = contract.default_transport() if share == "auto" else share
    if chosen == "virtiofs" and review:
        raise ConfigError(
            "--share virtiofs: --review reads the guest's modes and symlinks from 9p's xattrs",
            "drop --share virtiofs with --review",
        )
    return chosen


def check(ids: IdMap, transports: tuple[str, ...]) -> None:
    """Refuse, in one line with the fix, a virtio-fs workspace this host or image cannot serve.

    Never a silent downgrade to 9p: the user asked for virtio-fs's semantics.
    """
    refused = unsupported(ids, transports)
    if refused is not None:
        raise ConfigError(f"--share virtiofs: {refused[0]}", refused[1])


def fuse_opt(value: Path | str) -> str:
    """One value for the daemon's `-o` list, which splits on commas unless escaped."""
    return str(value).replace("\\", "\\\\").replace(",", "\\,")


def daemon_argv(
    daemon: Path, ids: IdMap, workspace: Path, fd: int, cache: str = "auto"
) -> list[str]:
    """The daemon in its user namespace; `ids` must be a "userns" mapping.

    `cache=auto`: the guest trusts what it cached for a second (host edits
    show within it); `none` re-asks the daemon every time (bench/share.py).
    """
    user = contract.raw()["user"]
    return [
        *idmap.userns_argv(ids.prefix[0], int(user["uid"]), int(user["gid"]), keep_caps=True),
        str(daemon), f"--fd={fd}", "--rlimit-nofile=0",
        "-o", f"source={fuse_opt(workspace)}", "-o", "sandbox=namespace", "-o", f"cache={cache}",
        "-o", "no_posix_lock", "-o", "no_flock", "-o", "no_xattr",
    ]  # fmt: skip


def _confine(pdeathsig: bool, install_filter: Callable[[], None]) -> None:
    """In the child before exec: file limit up to the hard limit, die with vmctl, filter.

    The filter comes imported: a fork must not import (another thread may
    hold the import lock).
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if pdeathsig:
        die_with_parent()
    install_filter()


def start_daemon(
    ids: IdMap,
    workspace: Path,
    sock_path: Path,
    log_path: Path,
    *,
    detach: bool,
    cache: str = "auto",
) -> subprocess.Popen[bytes]:
    """Bind `sock_path` (QEMU's `-chardev socket,path=`) and start the daemon on it.

    A foreground guest's daemon dies with vmctl (as QEMU does); either way
    it exits when QEMU disconnects.
    """
    from vmctl.sandbox import seccomp

    daemon = find_daemon()
    if daemon is None:
        raise VMError("virtiofsd is not installed", FIX_9P)
    sock_path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(sock_path))
        sock.listen(1)
        argv = daemon_argv(daemon, ids, workspace, sock.fileno(), cache)
        with open(log_path, "ab") as log:
            try:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(sock.fileno(),),
                    cwd=log_path.parent,
                    start_new_session=True,
                    preexec_fn=lambda: _confine(not detach, seccomp.install),
                )
            except (OSError, subprocess.SubprocessError) as e:
                raise VMError(f"cannot start {daemon}: {e}", f"see {log_path}") from e


def spawn(ipaths: paths.InstancePaths, ids: IdMap, workspace: Path, detach: bool) -> ProcessRef:
    """The instance's daemon, recorded by vmctl.vm.instance and stopped with the guest."""
    proc = start_daemon(ids, workspace, ipaths.virtiofs_socket, ipaths.virtiofs_log, detach=detach)
    return hold(proc)


def stop(ref: ProcessRef | None) -> None:
    if ref is not None and ref.alive():
        ref.terminate(timeout=3.0)
