"""Which host folder an agent may work in, and which path text may reach a sandbox.

Kept apart from the policy machinery (launch, resolve, bwrap): `vmctl up`
checks its workspace before it starts QEMU and needs nothing else from
the sandbox, whose modules cost about 30 ms to import.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vmctl import paths
from vmctl.errors import ConfigError, SandboxError

#: Control characters: no path or value holding one is passed to a sandbox.
BAD_CHARS = re.compile(r"[\x00-\x1f\x7f]")

#: Folders an agent may never have as its workspace, nor anything inside them:
#: the system's, credentials under $HOME, and vmctl's own state and cache
#: (the cache holds guest images and the client binaries the host runs).
SYSTEM_DIRS = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/boot", "/dev",
               "/proc", "/sys", "/System", "/Library", "/private/etc")  # fmt: skip
HOME_SECRETS = (".ssh", ".gnupg", ".aws", ".kube", ".docker")


def check_path_text(text: str, what: str = "path") -> str:
    """Refuse text that cannot be passed safely (NUL, newline, control chars)."""
    if BAD_CHARS.search(text):
        raise SandboxError(
            f"refusing {what} with a control character (NUL, newline, ...): {text!r}",
            "rename the file or folder; such paths cannot be passed to a sandbox safely",
        )
    return text


def check_workspace(path: Path | str) -> Path:
    """Canonical workspace folder.

    Refused: /, $HOME, vmctl's state and their ancestors; system and credential
    folders, vmctl's state and cache, and anything inside them.
    """
    text = check_path_text(str(path), "workspace")
    real = Path(os.path.realpath(Path(text).expanduser()))
    if not real.is_dir():
        what = "is not a folder" if real.exists() else "does not exist"
        raise ConfigError(f"workspace {text} {what}", "create it or pass another with -w DIR")
    home = Path(os.path.realpath(Path.home()))
    guarded = {Path("/"), home, Path(os.path.realpath(paths.home()))}
    for g in guarded:
        if real == g or real in g.parents:
            raise ConfigError(
                f"refusing workspace {real}: it is or contains {g}",
                "pass a project folder with -w DIR",
            )
    inside = [Path(os.path.realpath(d)) for d in SYSTEM_DIRS if os.path.isdir(d)]
    inside += [home / d for d in HOME_SECRETS]
    inside += [Path(os.path.realpath(paths.home())), Path(os.path.realpath(paths.cache_home()))]
    for g in inside:
        if real == g or g in real.parents:
            raise ConfigError(
                f"refusing workspace {real}: it is inside {g}, which no agent may write",
                "pass a project folder with -w DIR",
            )
    return real
