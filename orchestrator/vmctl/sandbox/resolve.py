"""A policy made concrete: placeholders filled, every path canonical.

`resolve()` fills a policy's placeholders from a `SandboxContext` and
canonicalises every path (Seatbelt matches real paths: /tmp is
/private/tmp on macOS), collecting the symlinks met on the way so bwrap
can recreate them. Kept apart from the strict loader in `vmctl.sandbox.policy`:
that one reads files, this one reads the live filesystem.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vmctl.errors import SandboxError
from vmctl.sandbox.policy import PLACEHOLDER_RE, Policy, Rules, current_platform
from vmctl.sandbox.workspace import check_path_text


@dataclass(frozen=True)
class SandboxContext:
    """The concrete values a policy's placeholders are filled with."""

    binary: Path
    cache: Path | None = None  # the writable folder of a server
    runtime: Path | None = None  # socket folder (read-write)
    model: tuple[Path, ...] = ()
    workspace: Path | None = None
    state: Path | None = None  # a client's private state folder
    endpoint_port: int | None = None  # model endpoint, for connect policies
    endpoint_socket: Path | None = None
    extra_read: tuple[Path, ...] = ()
    extra_exec: tuple[Path, ...] = ()
    gpu: tuple[str, ...] = ()  # GPU kinds granted ([gpu.KIND] tables; Linux only)


@dataclass(frozen=True)
class Link:
    """A symlink met while resolving a path: recreated (bwrap) or stat-able (SBPL)."""

    path: Path
    target: str


@dataclass(frozen=True)
class Resolved:
    """A policy with every placeholder filled and every path canonical."""

    policy: Policy
    platform: str
    read: tuple[Path, ...]
    write: tuple[Path, ...]
    exec: tuple[Path, ...]
    exec_dirs: tuple[Path, ...]  # for PATH, as written (symlinks kept)
    links: tuple[Link, ...]
    optional: frozenset[Path]  # may be missing: bwrap skips those
    cwd: Path | None
    setenv: dict[str, str]
    env: tuple[str, ...]
    endpoint_port: int | None
    endpoint_socket: Path | None
    darwin: Rules = field(default_factory=Rules)  # resolved darwin-only lists
    devices: tuple[Path, ...] = ()  # device nodes bound in read-write (GPU)


def _darwin_dir(name: str, example: str) -> Path:
    """Apple's per-user folders (Metal caches live there); an example off macOS."""
    if sys.platform != "darwin":
        return Path(example)
    import subprocess

    out = subprocess.run(
        ["/usr/bin/getconf", name], capture_output=True, text=True, timeout=10, check=False
    )
    value = out.stdout.strip()
    if out.returncode != 0 or not value.startswith("/"):
        raise SandboxError(f"cannot read {name} with getconf", "check /usr/bin/getconf")
    return Path(value)


def _values(name: str, ctx: SandboxContext) -> list[Path]:
    one = {
        "binary": ctx.binary,
        "binary_dir": ctx.binary.parent,
        "cache": ctx.cache,
        "runtime": ctx.runtime,
        "workspace": ctx.workspace,
        "state": ctx.state,
        "endpoint_socket": ctx.endpoint_socket,
    }
    if name in one:
        value = one[name]
        return [] if value is None else [value]
    if name == "model":
        return list(ctx.model)
    if name == "home":
        return [Path.home()]
    if name == "darwin_user_temp":
        return [_darwin_dir("DARWIN_USER_TEMP_DIR", "/private/var/folders/xx/example/T")]
    return [_darwin_dir("DARWIN_USER_CACHE_DIR", "/private/var/folders/xx/example/C")]


def symlinks_on(path: str, limit: int = 40) -> list[Link]:
    """Every symlink met while resolving `path`, with its location made real."""
    links: list[Link] = []
    parts, cur = list(Path(path).parts[1:]), Path("/")
    while parts:
        name = parts.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            cur = cur.parent
            continue
        nxt = cur / name
        if not nxt.is_symlink():
            cur = nxt
            continue
        if len(links) >= limit:
            raise SandboxError(f"too many symlinks resolving {path}")
        target = os.readlink(nxt)
        links.append(Link(nxt, target))
        parts = list(Path(target).parts) + parts
        if target.startswith("/"):
            parts, cur = parts[1:], Path("/")
    return links


def within(path: Path, folders: list[Path] | tuple[Path, ...]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def minimal(paths: list[Path]) -> list[Path]:
    """Drop duplicates and paths inside another path of the list, keeping order."""
    unique = list(dict.fromkeys(paths))
    return [p for p in unique if not any(f != p and f in p.parents for f in unique)]


class _Resolver:
    """Expands entries for one (policy, context, platform); collects links."""

    def __init__(self, policy: Policy, ctx: SandboxContext, platform: str, strict: bool):
        self.policy, self.ctx, self.platform, self.strict = policy, ctx, platform, strict
        self.native = platform == current_platform()
        self.links: dict[Path, Link] = {}
        self.optional: set[Path] = set()

    def written(self, entry: str) -> list[tuple[str, bool]]:
        """The entry's paths as written (placeholders filled), each with `optional`."""
        optional = entry.startswith("?")
        text = entry.removeprefix("?")
        m = PLACEHOLDER_RE.match(text)
        if not m:
            return [(text, optional)]
        values = _values(m.group(1), self.ctx)
        if not values and not optional:
            raise SandboxError(
                f"profile {self.policy.name} needs {{{m.group(1)}}}, which was not given",
                f"pass a {m.group(1)} value (see host-profiles/README.md)",
            )
        out = []
        for v in values:
            raw = check_path_text(str(v))
            if not raw.startswith("/"):
                raw = str(Path(raw).absolute())
            out.append((raw + text[m.end() :], optional))
        return out

    def canonical(self, raw: str, optional: bool) -> Path:
        check_path_text(raw)
        if not self.native:
            return Path(os.path.normpath(raw))
        exists = os.path.lexists(raw)
        if self.strict and not optional and not exists:
            raise SandboxError(
                f"profile {self.policy.name}: {raw} does not exist",
                "create it, or mark the entry optional with a leading '?'",
            )
        for link in symlinks_on(raw):
            self.links.setdefault(link.path, link)
        real = Path(os.path.realpath(raw))
        check_path_text(str(real))
        if optional and not real.exists():
            self.optional.add(real)
        return real

    def paths(self, entries: tuple[str, ...], extra: tuple[Path, ...] = ()) -> list[Path]:
        pairs = [w for e in entries for w in self.written(e)]
        pairs += [(str(p.absolute()), False) for p in extra]
        return [self.canonical(raw, opt) for raw, opt in pairs]

    def value(self, template: str) -> str:
        m = PLACEHOLDER_RE.match(template)
        if not m:
            return check_path_text(template, "environment value")
        values = self.written(template)
        if not values:
            raise SandboxError(f"profile {self.policy.name} needs {{{m.group(1)}}}")
        return values[0][0]


def gpu_grants(
    policy: Policy, kinds: tuple[str, ...], platform: str
) -> tuple[list[Path], tuple[str, ...], tuple[str, ...]]:
    """(device nodes, read entries, env names) for the GPU kinds granted.

    Device entries may end in a glob (`/dev/nvidia[0-9]*`); a required entry
    that matches nothing means the driver is not loaded: one clear error
    rather than a sandbox that silently runs on the CPU. macOS needs none of
    this (Metal is granted by the `[darwin]` table).
    """
    if not kinds or platform != "linux":
        return [], (), ()
    devices: list[Path] = []
    read: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    for kind in kinds:
        rules = policy.gpu_rules(kind)
        if rules is None:
            raise SandboxError(
                f"profile {policy.name} grants no {kind} GPU",
                f"add a [gpu.{kind}] table to {policy.source.name}, or serve with --no-gpu",
            )
        for entry in rules.devices:
            pattern = entry.removeprefix("?")
            found = sorted(glob.glob(pattern)) if any(c in pattern for c in "*[") else (
                [pattern] if os.path.exists(pattern) else []
            )  # fmt: skip
            if not found and not entry.startswith("?"):
                raise SandboxError(
                    f"no {kind} device matches {pattern}: is the GPU driver loaded?",
                    "check the driver (nvidia-smi, vulkaninfo, rocminfo), or serve with --no-gpu",
                )
            devices += [Path(os.path.realpath(f)) for f in found]
        read += rules.read
        env += rules.env
    return list(dict.fromkeys(devices)), read, env


def resolve(policy: Policy, ctx: SandboxContext, platform: str, *, strict: bool = True) -> Resolved:
    """Fill placeholders and canonicalise; `strict` requires non-optional paths to exist."""
    if ctx.endpoint_port is not None and not 0 < ctx.endpoint_port < 65536:
        raise SandboxError(f"invalid endpoint port {ctx.endpoint_port}")
    rules = policy.rules(platform)
    r = _Resolver(policy, ctx, platform, strict)
    devices, gpu_read, gpu_env = gpu_grants(policy, ctx.gpu, platform)
    write = minimal(r.paths(rules.write))
    read_entries = rules.read + gpu_read
    read = [p for p in minimal(r.paths(read_entries, ctx.extra_read)) if not within(p, write)]
    exec_written = [w for e in rules.exec for w in r.written(e)]
    exec_written += [(str(p.absolute()), False) for p in ctx.extra_exec]
    execs = list(dict.fromkeys(r.canonical(raw, opt) for raw, opt in exec_written))
    exec_dirs = [Path(raw) if os.path.isdir(raw) else Path(raw).parent for raw, _ in exec_written]
    for raw, opt in (w for e in rules.links for w in r.written(e)):
        r.canonical(raw, opt)
    setenv = {k: r.value(v) for k, v in rules.setenv}
    setenv.setdefault("PATH", ":".join(str(d) for d in dict.fromkeys(exec_dirs)))
    socket = ctx.endpoint_socket
    darwin = Rules(
        metadata=tuple(str(p) for p in r.paths(rules.metadata)),
        map_executable=tuple(str(p) for p in r.paths(rules.map_executable)),
        extensions=tuple(str(p) for p in r.paths(rules.extensions)),
        iokit=rules.iokit, mach_lookup=rules.mach_lookup,
        xpc_services=rules.xpc_services, sysctl=rules.sysctl,
    )  # fmt: skip
    return Resolved(
        policy=policy, platform=platform, read=tuple(read), write=tuple(write),
        exec=tuple(execs), exec_dirs=tuple(dict.fromkeys(exec_dirs)),
        links=tuple(r.links.values()), optional=frozenset(r.optional),
        cwd=r.canonical(r.value(policy.cwd), True) if policy.cwd else None,
        setenv=setenv, env=rules.env + gpu_env, endpoint_port=ctx.endpoint_port,
        endpoint_socket=r.canonical(str(socket.absolute()), True) if socket else None,
        darwin=darwin, devices=tuple(devices),
    )  # fmt: skip
