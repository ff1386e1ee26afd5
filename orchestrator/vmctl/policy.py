"""Host sandbox policies: one TOML file per profile, rendered per platform.

A policy says what a process may read, write and execute, which network it
gets (`none`, `bind` its own socket, or `connect` to the model endpoint) and
which environment variables pass. It is data (host-profiles/*.toml, format
in host-profiles/README.md), parsed strictly: an unknown key is an error
naming the key and the file. `resolve()` fills the placeholders from a
`SandboxContext` and canonicalises every path (Seatbelt matches real paths:
/tmp is /private/tmp on macOS), so the renderers (`seatbelt`, `bwrap`) only
ever see absolute, checked paths.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmctl.errors import ConfigError, SandboxError

PROFILE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")  # iokit classes, mach services, sysctl prefixes
ENV_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
#: Variable names that never pass into a sandbox, whatever a profile says.
SECRET_RE = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|_KEY$|_KEY_|^AWS_|^SSH_AUTH", re.I)
PLACEHOLDER_RE = re.compile(r"^\{([a-z_]+)\}")
BAD_CHARS = re.compile(r"[\x00-\x1f\x7f]")
NETWORK_MODES = ("none", "bind", "connect")
PLATFORMS = ("linux", "darwin")

LIST_KEYS = ("read", "write", "exec", "links", "env")
DARWIN_KEYS = (
    "metadata",
    "map_executable",
    "extensions",
    "iokit",
    "mach_lookup",
    "xpc_services",
    "sysctl",
)
TOP_KEYS = (
    "description",
    "cwd",
    "fork",
    "private_tmp",
    "network",
    "setenv",
    *LIST_KEYS,
    *PLATFORMS,
)
PLACEHOLDERS = (
    "binary", "binary_dir", "model", "cache", "runtime", "workspace", "state", "home",
    "endpoint_socket", "darwin_user_temp", "darwin_user_cache",
)  # fmt: skip


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


@dataclass(frozen=True)
class Rules:
    """The allow-lists of one table (top level, `[linux]` or `[darwin]`)."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    exec: tuple[str, ...] = ()
    links: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    setenv: tuple[tuple[str, str], ...] = ()
    metadata: tuple[str, ...] = ()
    map_executable: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    iokit: tuple[str, ...] = ()
    mach_lookup: tuple[str, ...] = ()
    xpc_services: tuple[str, ...] = ()
    sysctl: tuple[str, ...] = ()

    def merged(self, other: Rules) -> Rules:
        """Lists concatenated; a platform's `setenv` overrides the common one."""
        env = dict(self.setenv) | dict(other.setenv)
        lists = {k: getattr(self, k) + getattr(other, k) for k in (*LIST_KEYS, *DARWIN_KEYS)}
        return Rules(**lists, setenv=tuple(env.items()))


@dataclass(frozen=True)
class Policy:
    """One host profile as written in its TOML file (placeholders unfilled)."""

    name: str
    source: Path
    description: str
    network: str
    kill_on_outbound: bool
    fork: bool
    private_tmp: bool  # Linux: a writable, private, in-memory /tmp (and /dev)
    cwd: str | None
    common: Rules
    linux: Rules
    darwin: Rules

    def rules(self, platform: str) -> Rules:
        return self.common.merged(self.linux if platform == "linux" else self.darwin)

    def placeholders(self, platform: str) -> set[str]:
        """The placeholders this policy uses on `platform` (what a context must give)."""
        r = self.rules(platform)
        entries = [e for k in (*LIST_KEYS, *DARWIN_KEYS) for e in getattr(r, k)]
        entries += [v for _, v in r.setenv] + ([self.cwd] if self.cwd else [])
        found = (PLACEHOLDER_RE.match(e.removeprefix("?")) for e in entries)
        return {m.group(1) for m in found if m}


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


def check_path_text(text: str, what: str = "path") -> str:
    """Refuse text that cannot be passed safely (NUL, newline, control chars)."""
    if BAD_CHARS.search(text):
        raise SandboxError(
            f"refusing {what} with a control character (NUL, newline, ...): {text!r}",
            "rename the file or folder; such paths cannot be passed to a sandbox safely",
        )
    return text


def _err(source: Path, message: str) -> ConfigError:
    return ConfigError(f"{source}: {message}", "see host-profiles/README.md for the format")


def _strings(source: Path, where: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _err(source, f"{where}{key} must be a list of strings")
    return tuple(value)


def _rules(source: Path, table: dict[str, Any], where: str, allowed: tuple[str, ...]) -> Rules:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in allowed:
            raise _err(source, f"unknown key {key!r} in {where or 'the top level'}")
        if key == "setenv":
            ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
            if not ok:
                raise _err(source, f"setenv in {where or 'the top level'} must map to strings")
            out[key] = tuple(value.items())
        elif key in (*LIST_KEYS, *DARWIN_KEYS):
            out[key] = _strings(source, f"[{where}] " if where else "", key, value)
    rules = Rules(**out)
    for name in (*rules.env, *(k for k, _ in rules.setenv)):
        if not ENV_RE.match(name):
            raise _err(source, f"bad environment variable name {name!r}")
    for name in rules.env:
        if SECRET_RE.search(name):
            raise _err(source, f"env may not pass {name!r}: it looks like a credential")
    for name in (*rules.iokit, *rules.mach_lookup, *rules.xpc_services, *rules.sysctl):
        if not NAME_RE.match(name):
            raise _err(source, f"bad name {name!r} (letters, digits, '.', '_', '-')")
    paths = (rules.read, rules.write, rules.exec, rules.links, rules.metadata, rules.map_executable)
    for entry in (e for group in (*paths, rules.extensions) for e in group):
        _check_entry(source, entry)
    return rules


def _check_entry(source: Path, entry: str) -> None:
    text = entry.removeprefix("?")
    m = PLACEHOLDER_RE.match(text)
    if m and m.group(1) not in PLACEHOLDERS:
        raise _err(source, f"unknown placeholder {{{m.group(1)}}} in {entry!r}")
    if not m and not text.startswith("/"):
        raise _err(source, f"path {entry!r} must be absolute or start with a placeholder")
    if "{" in text[m.end() if m else 0 :] or BAD_CHARS.search(text):
        raise _err(source, f"bad path {entry!r} (one placeholder, at the start)")


def load_file(path: Path) -> Policy:
    """Parse one policy file strictly."""
    if not PROFILE_RE.match(path.stem):
        raise ConfigError(f"invalid profile file name {path.name!r}", "use [a-z0-9-].toml")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read profile {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise _err(path, f"invalid TOML: {e}") from e
    for key in data:
        if key not in TOP_KEYS:
            raise _err(path, f"unknown key {key!r} at the top level")
    net = data.get("network", {})
    if not isinstance(net, dict) or set(net) - {"mode", "kill_on_outbound"}:
        extra = sorted(set(net) - {"mode", "kill_on_outbound"}) if isinstance(net, dict) else []
        raise _err(path, f"[network] takes mode and kill_on_outbound (got {extra})")
    mode, kill = net.get("mode", "none"), net.get("kill_on_outbound", False)
    if mode not in NETWORK_MODES or not isinstance(kill, bool):
        raise _err(path, f"network.mode must be one of {', '.join(NETWORK_MODES)}")
    if kill and mode == "connect":
        raise _err(path, "kill_on_outbound contradicts network.mode = connect")
    desc, fork, cwd = data.get("description", ""), data.get("fork", True), data.get("cwd")
    private_tmp = data.get("private_tmp", False)
    if not isinstance(desc, str) or not isinstance(fork, bool) or not isinstance(private_tmp, bool):
        raise _err(path, "description must be a string, fork and private_tmp booleans")
    if cwd is not None:
        if not isinstance(cwd, str):
            raise _err(path, "cwd must be a path string")
        _check_entry(path, cwd)
    top = {k: v for k, v in data.items() if k in (*LIST_KEYS, "setenv")}
    tables = {}
    for plat in PLATFORMS:
        table = data.get(plat, {})
        if not isinstance(table, dict):
            raise _err(path, f"[{plat}] must be a table")
        extra_keys = DARWIN_KEYS if plat == "darwin" else ()
        tables[plat] = _rules(path, table, plat, (*LIST_KEYS, "setenv", *extra_keys))
    common = _rules(path, top, "", (*LIST_KEYS, "setenv"))
    return Policy(
        name=path.stem, source=path, description=desc, network=mode, kill_on_outbound=kill,
        fork=fork, private_tmp=private_tmp, cwd=cwd, common=common,
        linux=tables["linux"], darwin=tables["darwin"],
    )  # fmt: skip


def search_path() -> list[Path]:
    """Where profiles are looked up, first match wins."""
    here = Path(__file__).resolve().parent
    dirs = [here / "host-profiles", here.parents[1] / "host-profiles"]
    env = os.environ.get("VMCTL_PROFILES_DIR")
    return ([Path(env)] if env else []) + dirs


def find(name: str) -> Path:
    if not PROFILE_RE.match(name):
        raise ConfigError(f"invalid profile name {name!r}", "see `vmctl sandbox list`")
    for folder in search_path():
        candidate = folder / f"{name}.toml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no sandbox profile {name!r}", "see `vmctl sandbox list`")


def load(name: str) -> Policy:
    return load_file(find(name))


def list_profiles() -> list[str]:
    """Every profile name on the search path (earlier folders shadow later ones)."""
    names: set[str] = set()
    for folder in search_path():
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.toml") if PROFILE_RE.match(p.stem))
    return sorted(names)


def current_platform() -> str:
    return "darwin" if sys.platform == "darwin" else "linux"


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


def resolve(policy: Policy, ctx: SandboxContext, platform: str, *, strict: bool = True) -> Resolved:
    """Fill placeholders and canonicalise; `strict` requires non-optional paths to exist."""
    if ctx.endpoint_port is not None and not 0 < ctx.endpoint_port < 65536:
        raise SandboxError(f"invalid endpoint port {ctx.endpoint_port}")
    rules = policy.rules(platform)
    r = _Resolver(policy, ctx, platform, strict)
    write = minimal(r.paths(rules.write))
    read = [p for p in minimal(r.paths(rules.read, ctx.extra_read)) if not within(p, write)]
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
        setenv=setenv, env=rules.env, endpoint_port=ctx.endpoint_port,
        endpoint_socket=r.canonical(str(socket.absolute()), True) if socket else None,
        darwin=darwin,
    )  # fmt: skip
