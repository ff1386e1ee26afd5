"""Who the host user is inside the guest: the workspace's id mapping.

The workspace is exported with `security_model=mapped-xattr` (see
`vmctl.vm.qemu`): QEMU reports a host file's real owner unless the guest
stored another in `user.virtfs.uid`, and creates every file as the user
running QEMU. So the guest's agent (the contract's uid/gid, 1000) can
change the user's files only if QEMU sees them as owned by 1000.

On Linux QEMU is started in a user namespace that maps the invoking uid and
gid, and nothing else, to the agent's (util-linux `unshare --user
--map-user --map-group`, which execs QEMU in place: the recorded pid,
PR_SET_PDEATHSIG, sockets and `-p` forwards are unchanged). QEMU then runs
without any capability: files owned by the host user look like the agent's,
everything it creates belongs to the host user, and other users' files
look like `nobody`. Where user namespaces are unavailable (macOS, a
hardened Linux), the guest's agent takes the host uid/gid instead, passed
on the kernel command line, as Lima does (said out loud on Linux; forced
with VMCTL_IDMAP=guest); as root that fallback would make the agent root,
so it is refused with the fix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vmctl import contract, ui
from vmctl.errors import ConfigError, VMError

PROBE_TIMEOUT_S = 10.0
MODES = ("auto", "userns", "guest")
FIX_USERNS = (
    "allow user namespaces (sysctl kernel.unprivileged_userns_clone=1;"
    " on Ubuntu kernel.apparmor_restrict_unprivileged_userns=0)"
)


@dataclass(frozen=True)
class IdMap:
    """How the host user becomes the guest's agent for one instance."""

    #: "userns" (QEMU in a user namespace) or "guest" (the agent takes host ids).
    how: str
    host_uid: int
    host_gid: int
    #: argv to put before QEMU's (empty for "guest").
    prefix: tuple[str, ...] = ()
    #: Why the fallback was taken, to be said out loud ("" when nothing to say).
    note: str = ""

    def cmdline(self) -> str:
        """Kernel command-line keys for the guest ("" when the agent keeps its ids)."""
        if self.how != "guest":
            return ""
        keys = contract.raw()["kernel_cmdline"]
        return f"{keys['uid']}={self.host_uid} {keys['gid']}={self.host_gid}"

    def describe(self) -> str:
        user = contract.raw()["user"]
        if self.how == "userns":
            return f"host uid {self.host_uid} is the guest's {user['name']} ({user['uid']})"
        return f"the guest's {user['name']} takes host uid {self.host_uid}"


def check_forwards(ids: IdMap, host_ports: list[int]) -> None:
    """QEMU in a user namespace keeps no privilege: refuse `-p` below the unprivileged ports."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        low = 1024
    bad = [p for p in host_ports if p < low]
    if ids.how == "userns" and bad:
        raise ConfigError(
            f"-p {bad[0]}:...: QEMU runs without privileges (in a user namespace) and"
            f" cannot listen on ports below {low}",
            f"use a host port of {low} or more",
        )


def userns_argv(unshare: str, uid: int, gid: int, keep_caps: bool = False) -> list[str]:
    """The prefix that execs a program with the invoking uid/gid mapped to uid/gid.

    `keep_caps`: the program keeps its capabilities inside the namespace
    (the virtio-fs daemon needs them for its own sandbox; QEMU runs without).
    """
    caps = ["--keep-caps"] if keep_caps else []
    return [unshare, "--user", f"--map-user={uid}", f"--map-group={gid}", *caps, "--"]


def probe_userns(unshare: str, uid: int, gid: int) -> str | None:
    """None if `unshare` can map us as the agent here; else what went wrong."""
    try:
        r = subprocess.run(
            [*userns_argv(unshare, uid, gid), "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]


def _userns(unshare: str | None, inner: tuple[int, int]) -> tuple[tuple[str, ...], str, str]:
    """(prefix, "", "") when a user namespace works here, else ((), why not, the fix)."""
    if not sys.platform.startswith("linux"):
        return (), "user namespaces are Linux-only", ""
    if unshare is None:
        return (), "`unshare` is not installed", "install util-linux"
    failed = probe_userns(unshare, *inner)
    if failed is not None:
        return (), f"user namespaces are unavailable ({failed})", FIX_USERNS
    return tuple(userns_argv(unshare, *inner)), "", ""


def choose(mode: str | None = None) -> IdMap:
    """The mapping for this host (VMCTL_IDMAP: auto, userns, guest); VMError with the fix."""
    mode = mode or os.environ.get("VMCTL_IDMAP") or "auto"
    if mode not in MODES:
        raise ConfigError(f"VMCTL_IDMAP={mode!r} is not one of {', '.join(MODES)}")
    user = contract.raw()["user"]
    uid, gid = os.geteuid(), os.getegid()
    why, fix = "VMCTL_IDMAP=guest", "unset VMCTL_IDMAP"
    if mode != "guest":
        inner = (int(user["uid"]), int(user["gid"]))
        prefix, why, fix = _userns(shutil.which("unshare"), inner)
        if prefix:
            return IdMap("userns", uid, gid, prefix)
        if mode == "userns":
            raise VMError(f"VMCTL_IDMAP=userns: {why}", fix)
    if uid == 0 or gid == 0:
        raise VMError(
            f"the guest's {user['name']} cannot take your ids (uid {uid}, gid {gid}): {why}",
            ", or ".join(h for h in (fix, "run vmctl as an ordinary user") if h),
        )
    quiet = sys.platform == "darwin" or mode == "guest"
    note = "" if quiet else f"{why}: the guest's {user['name']} takes your uid {uid} instead"
    return IdMap("guest", uid, gid, note=note)


def prepare(workspace: Path, host_ports: list[int]) -> IdMap:
    """`choose`, checked against the `-p` ports; says so when something is unusual."""
    ids = choose()
    check_forwards(ids, host_ports)
    if ids.note:
        ui.warn(ids.note)
    with contextlib.suppress(OSError):
        owner = workspace.stat().st_uid
        if owner != ids.host_uid:
            ui.warn(
                f"{workspace} belongs to uid {owner}, not to you (uid {ids.host_uid}):"
                " the guest's agent can change only your files there; run vmctl as its owner"
            )
    return ids
