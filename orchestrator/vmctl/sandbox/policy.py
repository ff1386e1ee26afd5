"""Host sandbox policies: one TOML file per profile, parsed strictly.

A policy says what a process may read, write and execute, which network it
gets (`none`, `bind` its own socket, or `connect` to the model endpoint) and
which environment variables pass. It is data (host-profiles/*.toml, format
in host-profiles/README.md), parsed strictly: an unknown key is an error
naming the key and the file. Placeholders stay unfilled here;
`vmctl.sandbox.resolve` fills them from a `SandboxContext` and canonicalises every
path, so the renderers (`seatbelt`, `bwrap`) only ever see checked paths.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmctl.errors import ConfigError
from vmctl.sandbox.workspace import BAD_CHARS

PROFILE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")  # iokit classes, mach services, sysctl prefixes
ENV_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
#: Variable names that never pass into a sandbox, whatever a profile says.
SECRET_RE = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|_KEY$|_KEY_|^AWS_|^SSH_AUTH", re.I)
PLACEHOLDER_RE = re.compile(r"^\{([a-z_]+)\}")
NETWORK_MODES = ("none", "bind", "connect")
GPU_KINDS = ("nvidia", "rocm", "vulkan")
GPU_KEYS = ("devices", "read", "env")
#: A device entry may end in one glob component (`/dev/nvidia[0-9]*`).
DEVICE_RE = re.compile(r"^(?!.*/\.\.?(/|$))/dev(/[A-Za-z0-9._-]+)*(/[A-Za-z0-9._*\[\]-]+)$")
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
    "gpu",
    *LIST_KEYS,
    *PLATFORMS,
)
PLACEHOLDERS = (
    "binary", "binary_dir", "model", "cache", "runtime", "workspace", "state", "home",
    "endpoint_socket", "darwin_user_temp", "darwin_user_cache",
)  # fmt: skip


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
class GpuRules:
    """One `[gpu.KIND]` table (Linux): device nodes bound in, driver files read, variables."""

    devices: tuple[str, ...] = ()
    read: tuple[str, ...] = ()
    env: tuple[str, ...] = ()


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
    gpu: tuple[tuple[str, GpuRules], ...] = ()

    def gpu_rules(self, kind: str) -> GpuRules | None:
        return dict(self.gpu).get(kind)

    def rules(self, platform: str) -> Rules:
        return self.common.merged(self.linux if platform == "linux" else self.darwin)

    def placeholders(self, platform: str) -> set[str]:
        """The placeholders this policy uses on `platform` (what a context must give)."""
        r = self.rules(platform)
        entries = [e for k in (*LIST_KEYS, *DARWIN_KEYS) for e in getattr(r, k)]
        entries += [v for _, v in r.setenv] + ([self.cwd] if self.cwd else [])
        found = (PLACEHOLDER_RE.match(e.removeprefix("?")) for e in entries)
        return {m.group(1) for m in found if m}


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


def _gpu(source: Path, value: Any) -> tuple[tuple[str, GpuRules], ...]:
    """`[gpu.KIND]` tables: devices under /dev (a last glob component), reads, env names."""
    if not isinstance(value, dict):
        raise _err(source, "[gpu] must hold [gpu.KIND] tables")
    out = []
    for kind, table in value.items():
        if kind not in GPU_KINDS or not isinstance(table, dict):
            raise _err(source, f"unknown GPU kind [gpu.{kind}] (one of {', '.join(GPU_KINDS)})")
        for key in table:
            if key not in GPU_KEYS:
                raise _err(source, f"unknown key {key!r} in [gpu.{kind}]")
        devices = _strings(source, f"[gpu.{kind}] ", "devices", table.get("devices", []))
        for d in devices:
            if not DEVICE_RE.match(d.removeprefix("?")):
                raise _err(source, f"[gpu.{kind}] device {d!r} is not a path under /dev")
        rules = _rules(source, {k: v for k, v in table.items() if k != "devices"}, f"gpu.{kind}",
                       ("read", "env"))  # fmt: skip
        out.append((kind, GpuRules(devices, rules.read, rules.env)))
    return tuple(out)


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
        linux=tables["linux"], darwin=tables["darwin"], gpu=_gpu(path, data.get("gpu", {})),
    )  # fmt: skip


def search_path() -> list[Path]:
    """Where profiles are looked up, first match wins."""
    here = Path(__file__).resolve().parents[1]  # the vmctl package
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
