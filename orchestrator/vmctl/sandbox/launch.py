"""The seam callers use: policy + context + argv -> a sandboxed command.

`sandboxed_command()` loads a host profile, resolves it against a
`SandboxContext` and hands it to the platform's backend (bwrap on Linux,
sandbox-exec on macOS), a small registry of `Backend`s. The result is
argv, a clean environment and files to write first (the SBPL profile);
the caller launches it with exactly that environment (`env=cmd.env`,
never merged with `os.environ`), so no credential reaches the child.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vmctl import paths
from vmctl.errors import ConfigError, SandboxError
from vmctl.sandbox import bwrap, policy, seatbelt
from vmctl.sandbox.policy import SECRET_RE
from vmctl.sandbox.resolve import Resolved, SandboxContext, resolve, within
from vmctl.sandbox.workspace import check_path_text, check_workspace

__all__ = [
    "SandboxContext",
    "SandboxedCommand",
    "check_available",
    "check_workspace",
    "clean_env",
    "run_sandboxed",
    "sandboxed_command",
    "unsandboxed_command",
]


@dataclass(frozen=True)
class SandboxedCommand:
    """What to launch: argv, its whole environment, files to write first."""

    argv: list[str]
    env: dict[str, str]
    files: dict[Path, str]  # files to write before launch (SBPL profile)
    cwd: Path | None = None  # for sandbox-exec; bwrap changes folder itself
    resolved: Resolved | None = field(default=None, compare=False, repr=False)

    def write_files(self) -> None:
        for path, text in self.files.items():
            paths.private_dir(path.parent)
            path.write_text(text)
            path.chmod(0o600)


class Backend(Protocol):
    """One OS sandbox: can it run here, and how a resolved policy becomes argv."""

    name: str

    def check(self) -> None: ...

    def command(self, res: Resolved, argv: list[str], profile_dir: Path) -> SandboxedCommand: ...


class BwrapBackend:
    name = "bwrap"

    def check(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SandboxError("bubblewrap runs only on Linux", "use --platform darwin on macOS")
        bwrap.probe(bwrap.find_bwrap())

    def command(self, res: Resolved, argv: list[str], profile_dir: Path) -> SandboxedCommand:
        native = sys.platform.startswith("linux")
        exe = bwrap.find_bwrap() if native else Path("/usr/bin/bwrap")
        return SandboxedCommand(bwrap.render(res, argv, exe), {}, {}, res.cwd)


class SeatbeltBackend:
    name = "sandbox-exec"

    def check(self) -> None:
        if sys.platform != "darwin" or not os.access(seatbelt.SANDBOX_EXEC, os.X_OK):
            raise SandboxError(
                f"{seatbelt.SANDBOX_EXEC} is not available: the sandbox cannot be applied",
                "sandbox-exec ships with macOS; --no-sandbox runs without one",
            )

    def command(self, res: Resolved, argv: list[str], profile_dir: Path) -> SandboxedCommand:
        prof = seatbelt.render(res)
        digest = hashlib.sha256(prof.text.encode()).hexdigest()[:12]
        file = profile_dir / f"{res.policy.name}-{digest}.sb"
        return SandboxedCommand(prof.argv(file, argv), {}, {file: prof.text}, res.cwd)


BACKENDS: dict[str, Backend] = {"linux": BwrapBackend(), "darwin": SeatbeltBackend()}


def _platform(platform: str | None) -> str:
    key = platform or policy.current_platform()
    if key not in BACKENDS:
        raise ConfigError(f"unknown platform {key!r}", f"use one of {', '.join(BACKENDS)}")
    return key


def check_available(platform: str | None = None) -> None:
    """Raise SandboxError (with a fix) unless this platform's sandbox works here."""
    BACKENDS[_platform(platform)].check()


def clean_env(allow: Iterable[str], extra: Mapping[str, str]) -> dict[str, str]:
    """Allow-listed variables of this process, minus credentials, plus `extra`.

    `extra` holds what vmctl itself sets (HOME, a client's config path, a
    gateway key) and is passed as given; the allow-list never passes a name
    that looks like a credential, whatever a profile says.
    """
    env = {k: os.environ[k] for k in allow if k in os.environ and not SECRET_RE.search(k)}
    env.update(extra)
    for key, value in env.items():
        check_path_text(key, "environment name")
        check_path_text(value, f"value of {key}")
    return env


def _argv0(res: Resolved, argv: list[str]) -> list[str]:
    """Make argv[0] the allowed executable it names, or refuse it early."""
    if not argv:
        raise ConfigError("no command given")
    name = argv[0]
    if "/" not in name:
        for folder in res.exec_dirs:
            if os.access(folder / name, os.X_OK):
                name = str(folder / name)
                break
    real = Path(os.path.realpath(name)) if policy.current_platform() == res.platform else None
    if real is not None and not within(real, res.exec):
        raise SandboxError(
            f"{argv[0]} is not an executable profile {res.policy.name} allows",
            "pass it as the binary (or extra_exec), or use a profile that lists it",
        )
    return [name, *argv[1:]]


def sandboxed_command(
    profile: str,
    argv: list[str],
    ctx: SandboxContext,
    *,
    env: Mapping[str, str] = {},
    platform: str | None = None,
    profile_dir: Path | None = None,
    render_only: bool = False,
) -> SandboxedCommand:
    """Render `argv` under `profile`.

    Off this platform, or with `render_only`, paths need not exist and the
    command is only for display (`vmctl sandbox show`).
    """
    key = _platform(platform)
    strict = key == policy.current_platform() and not render_only
    res = resolve(policy.load(profile), ctx, key, strict=strict)
    argv = _argv0(res, argv) if strict else list(argv)
    cmd = BACKENDS[key].command(res, argv, profile_dir or _profile_dir())
    full_env = clean_env(res.env, {**res.setenv, **env})
    return SandboxedCommand(cmd.argv, full_env, cmd.files, cmd.cwd, res)


def _profile_dir() -> Path:
    """Default home of rendered SBPL files (servers pass their own)."""
    return paths.sandbox_profiles_dir()


def unsandboxed_command(argv: list[str], env: Mapping[str, str], profile: str) -> SandboxedCommand:
    """For --no-sandbox (the caller warns loudly): no confinement, env still cleaned."""
    pol = policy.load(profile)
    rules = pol.rules(policy.current_platform())
    allow = (*rules.env, "PATH")
    return SandboxedCommand(list(argv), clean_env(allow, env), {})


def run_sandboxed(
    profile: str,
    argv: list[str],
    ctx: SandboxContext,
    *,
    env: Mapping[str, str] = {},
    profile_dir: Path | None = None,
) -> int:
    """Run `argv` under `profile` on this platform; returns its exit status."""
    check_available()
    cmd = sandboxed_command(profile, argv, ctx, env=env, profile_dir=profile_dir)
    cmd.write_files()
    try:
        return subprocess.run(cmd.argv, env=cmd.env, cwd=cmd.cwd, check=False).returncode
    except OSError as e:
        raise SandboxError(f"cannot start {cmd.argv[0]}: {e.strerror}") from e


def which(name: str) -> Path:
    """An executable on the host PATH, canonical; for `vmctl sandbox exec`."""
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"command not found: {name!r}")
    return Path(found).absolute()
