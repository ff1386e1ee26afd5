"""Policy -> bubblewrap argv (Linux).

The sandbox unshares every namespace (`--unshare-all`: no network at all,
so a server listens on a UNIX socket in a folder bound in from the host and
a client reaches the model through that socket bound in), drops every
capability (bwrap keeps them when started as root), dies with its parent
and runs in a new session (no TIOCSTI into the caller's terminal). The
filesystem is an empty root with `/proc`, a minimal `/dev`, a private
`/tmp`, read-only binds of what the policy reads and executes, read-write
binds of what it writes, and the symlinks met on the way (`/lib64`, ...).

The environment is not put on the command line (values would show in
`ps`): the caller execs bwrap with the clean environment of
`SandboxedCommand.env`, which the child inherits and nothing else.

Honest limits of the exec allow-list: bwrap cannot tell reading from
executing, so the allow-list is "only these executables are visible".
Everything visible with an exec bit can run, including helpers inside the
library folders, and a file the sandboxed process writes into its writable
folders and marks executable (or feeds to an allowed interpreter). The
boundary that holds is the filesystem and network view, not the exec list.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

from vmctl.errors import SandboxError
from vmctl.sandbox.resolve import Resolved, minimal, within
from vmctl.sandbox.workspace import check_path_text

PROBE_TIMEOUT = 15.0


def find_bwrap() -> Path:
    """bwrap's absolute path, resolved once per process."""
    found = _which()
    if found is None:
        raise SandboxError(
            "bubblewrap (bwrap) is not installed: the sandbox cannot be applied",
            "install it (apt-get install bubblewrap); --no-sandbox runs without one",
        )
    return found


@functools.cache
def _which() -> Path | None:
    found = shutil.which("bwrap")
    return Path(found).resolve() if found else None


def explain(stderr: str) -> SandboxError:
    """Turn bwrap's complaint into a message that says what to fix."""
    line = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
    if "RTM_NEWADDR" in stderr or "setting up uid map" in stderr or "Permission denied" in stderr:
        hint = (
            "unprivileged user namespaces are blocked (AppArmor on Ubuntu 24.04: "
            "sysctl kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor "
            "profile for bwrap)"
        )
    elif "Creating new namespace failed" in stderr or "No permissions to creat" in stderr:
        hint = (
            "this looks like an unprivileged container; run on the host, or allow "
            "user namespaces in the container"
        )
    else:
        hint = "run `bwrap --unshare-all --ro-bind / / true` to see why"
    return SandboxError(f"bubblewrap cannot create its sandbox: {line}", hint)


@functools.cache
def probe(bwrap: Path) -> None:
    """One cheap run proving namespaces can be created here (cached)."""
    try:
        out = subprocess.run(
            [str(bwrap), "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxError(f"cannot run {bwrap}: {e}", "check the bubblewrap install") from e
    if out.returncode != 0:
        raise explain(out.stderr)


def _arg(path: Path | str) -> str:
    """A path as one argv element: absolute, no leading '-', no control chars."""
    text = check_path_text(str(path))
    if text.startswith("-"):
        raise SandboxError(f"refusing path that looks like an option: {text!r}")
    return text


def mounts(res: Resolved) -> list[tuple[str, Path]]:
    """(bind option, path) pairs, parents before children (bwrap order matters)."""
    skip = {p for p in res.optional if not p.exists()}
    rw = [p for p in minimal(list(res.write)) if p not in skip]
    ro = [p for p in minimal([*res.read, *res.exec]) if p not in skip and not within(p, rw)]
    out = [("--ro-bind", p) for p in ro] + [("--bind", p) for p in rw]
    if res.policy.network == "connect" and res.endpoint_socket is not None:
        sock = res.endpoint_socket
        if not within(sock, [*ro, *rw]):
            out.append(("--ro-bind", sock))  # connect() works on a read-only mount
    return sorted(out, key=lambda m: (len(m[1].parts), str(m[1])))


def render(res: Resolved, cmd: list[str], bwrap: Path) -> list[str]:
    """The full argv: `bwrap OPTIONS -- CMD...`."""
    if res.policy.network == "connect" and res.endpoint_port and not res.endpoint_socket:
        raise SandboxError(
            f"profile {res.policy.name}: on Linux the sandbox has no network; "
            "the endpoint must be a UNIX socket",
            "pass endpoint_socket (the gateway's or a relay's socket)",
        )
    argv = [_arg(bwrap), "--unshare-all", "--die-with-parent", "--new-session"]
    argv += ["--cap-drop", "ALL", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for device in res.devices:  # GPU nodes: read-write, over the minimal /dev
        argv += ["--dev-bind", _arg(device), _arg(device)]
    placed = [path for _, path in mounts(res)]
    for option, path in mounts(res):
        argv += [option, _arg(path), _arg(path)]
    for link in res.links:
        if within(link.path, placed) or link.path == Path("/tmp"):
            continue
        argv += ["--symlink", _arg(link.target), _arg(link.path)]
    # Last, once every mount point and link exists: nothing but the policy's
    # write binds stays writable (a private /tmp and /dev when it asks).
    argv += ["--remount-ro", "/"]
    if not res.policy.private_tmp:
        argv += ["--remount-ro", "/tmp", "--remount-ro", "/dev"]
    if res.cwd is not None:
        argv += ["--chdir", _arg(res.cwd)]
    return [*argv, "--", *cmd]
