"""The agents a micro image can carry (`--with`): each from a read-only share.

A guest agent is installed once on the host into `images_dir/agents/NAME-VERSION`
and shared into the guest read-only at `/opt/vmctl/agents/NAME` (9p tag
`agent-NAME`); the initramfs holds only what points at it (a symlink or a
wrapper on PATH), its config folders, and the native libraries its binaries
need. The image's cache key names each agent's version.

- opencode: npm `opencode-ai`'s native binary (`--ignore-scripts`).
- claude: npm `@anthropic-ai/claude-code-linux-x64`, the native binary the
  wrapper package's postinstall would pick; plus a real bash (Claude Code's
  Bash tool refuses busybox sh).
- codex: npm `@openai/codex`'s linux-x64 build (`VERSION-linux-x64`), a
  static musl binary: nothing in the initramfs but the link.
- llm: the cheapest working runtime found: this host's own CPython binary
  and standard library (copied, tests and GUI modules left out, compiled to
  .pyc) plus `pip install --target` of llm; about 60 MB on the share and
  its native libraries in the initramfs. A wrapper runs it with `-E -s`.
"""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmctl import paths, ui
from vmctl.errors import VMError
from vmctl.images.cpio import Archive
from vmctl.images.micro_kernel import run

#: The pinned versions, one file for this module and scripts/install-agents.sh.
VERSIONS: dict[str, str] = {
    k: v
    for k, v in json.loads(paths.data_text("agent-versions.json")).items()
    if not k.startswith("_")
}
MOUNT_ROOT = "/opt/vmctl/agents"
SHARE_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144,ro,nodev,nosuid,cache=loose"
NPM_HINT = "install Node.js and npm (apt-get install npm), and reach the npm registry"
PY = f"python{sys.version_info.major}.{sys.version_info.minor}"
#: Left out of the guest's standard library: tests, GUIs, installers.
STDLIB_SKIP = (
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "__pycache__",
    "site-packages",
    "dist-packages",
    "config-*",
    "_test*",
    "xxlimited*",
    "_xxtestfuzz*",
    "_tkinter*",
    "nis.*",
)


@dataclass(frozen=True)
class GuestAgent:
    """One agent: its pinned version and the files that are its binaries."""

    name: str
    version: str
    binary: str  # inside its share
    install: Callable[[Path, str], None]  # (tmp folder, version) -> fills it

    @property
    def tag(self) -> str:
        return f"agent-{self.name}"

    @property
    def mountpoint(self) -> str:
        return f"{MOUNT_ROOT}/{self.name}"

    def folder(self) -> Path:
        return paths.image_agents_dir() / f"{self.name}-{self.version}"


def publish(tmp: Path, target: Path) -> None:
    """Put a finished build folder in place of `target`, an older one removed.

    Builds happen in a temporary folder beside the target, so a crash
    never leaves a half-built image or agent where vmctl would use it.
    """
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def _npm(package: str, tag: str = "") -> Callable[[Path, str], None]:
    """npm install PACKAGE@VERSION+tag, its install scripts off."""

    def install(tmp: Path, version: str) -> None:
        if not shutil.which("npm"):
            raise VMError("npm not found (needed for --with)", NPM_HINT)
        argv = ["npm", "install", "--prefix", str(tmp), "--no-audit", "--no-fund"]
        run([*argv, "--ignore-scripts", f"{package}@{version}{tag}"], "npm install", NPM_HINT)

    return install


def _install_python_llm(tmp: Path, version: str) -> None:
    """This interpreter and its stdlib, plus llm installed beside them."""
    exe = Path(sys.executable).resolve()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (tmp / "bin").mkdir()
    shutil.copy2(exe, tmp / "bin" / "python3")
    shutil.copytree(stdlib, tmp / "lib" / PY, ignore=shutil.ignore_patterns(*STDLIB_SKIP))
    dynload = Path(sysconfig.get_config_var("DESTSHARED") or stdlib / "lib-dynload")
    if dynload.is_dir() and not (tmp / "lib" / PY / "lib-dynload").exists():
        shutil.copytree(
            dynload, tmp / "lib" / PY / "lib-dynload", ignore=shutil.ignore_patterns(*STDLIB_SKIP)
        )
    hint = "reach the PyPI registry (pip install llm)"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-warn-script-location"]
    run([*pip, "--target", str(tmp / "site"), f"llm=={version}"], "pip install llm", hint)
    py = str(tmp / "bin" / "python3")
    run([py, "-E", "-s", "-m", "compileall", "-q", str(tmp / "lib"), str(tmp / "site")],
        "compileall", hint)  # fmt: skip


AGENTS: dict[str, GuestAgent] = {
    a.name: a
    for a in (
        GuestAgent(
            "opencode",
            VERSIONS["opencode"],
            "node_modules/opencode-linux-x64/bin/opencode",
            _npm("opencode-ai"),
        ),
        GuestAgent(
            "claude",
            VERSIONS["claude"],
            "node_modules/@anthropic-ai/claude-code-linux-x64/claude",
            _npm("@anthropic-ai/claude-code-linux-x64"),
        ),
        GuestAgent(
            "codex",
            VERSIONS["codex"],
            "node_modules/@openai/codex/vendor/x86_64-unknown-linux-musl/bin/codex",
            _npm("@openai/codex", "-linux-x64"),
        ),
        GuestAgent("llm", VERSIONS["llm"], "bin/python3", _install_python_llm),
    )
}


def install(agent: GuestAgent) -> Path:
    """Install `agent` once into its share folder; a cheap check afterwards."""
    target = agent.folder()
    if (target / agent.binary).is_file() and (target / ".complete").exists():
        target.chmod(0o755)  # the guest's agent user must enter the share
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with ui.step(f"installing {agent.name} {agent.version} for the guest"):
        tmp = Path(tempfile.mkdtemp(prefix=f"{agent.name}-", dir=target.parent))
        try:
            agent.install(tmp, agent.version)
            if not (tmp / agent.binary).is_file():
                raise VMError(f"installing {agent.name} left no {agent.binary}", NPM_HINT)
            (tmp / ".complete").write_text(agent.version + "\n")
            tmp.chmod(0o755)
            publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def native_files(agent: GuestAgent, folder: Path) -> list[Path]:
    """The share's ELF files whose libraries the initramfs must hold."""
    if agent.name == "codex":
        return []  # static
    if agent.name != "llm":
        return [folder / agent.binary]
    mods = [*(folder / "lib" / PY / "lib-dynload").glob("*.so"), *(folder / "site").rglob("*.so")]
    return [folder / agent.binary, *sorted(mods)]


def host_tools(agents: tuple[str, ...]) -> list[Path]:
    """Host binaries copied into the initramfs for these agents."""
    tools = [Path("/usr/bin/rg")] if agents else []
    if "claude" in agents:
        tools.append(Path("/bin/bash"))
    for tool in tools:
        if not tool.is_file():
            pkg = "ripgrep" if tool.name == "rg" else tool.name
            raise VMError(
                f"{tool} not found (the guest's agents need it)", f"apt-get install {pkg}"
            )
    return tools


LLM_WRAPPER = """\
#!/bin/sh
exec {root}/bin/python3 -E -s -c 'import sys; sys.path.insert(0, "{root}/site"); \
sys.argv[0] = "llm"; from llm.cli import cli; cli()' "$@"
"""


def add_parts(archive: Archive, agent: GuestAgent, uid: int, gid: int, home: str) -> None:
    """What points at the share, and the config folders the agent needs."""
    root = agent.mountpoint
    archive.dir(root)
    if agent.name == "llm":
        archive.file("usr/local/bin/llm", LLM_WRAPPER.format(root=root).encode(), 0o755)
        return
    archive.symlink(f"usr/local/bin/{agent.name}", f"{root}/{agent.binary}")
    if agent.name == "opencode":
        # An empty node_modules plus this lock file stops its plugin npm install.
        cfg = f"{home}/.config/opencode"
        for d in (f"{home}/.config", cfg, f"{cfg}/node_modules"):
            archive.dir(d, 0o755, uid, gid)
        lock = {
            "lockfileVersion": 3,
            "packages": {"": {"dependencies": {"@opencode-ai/plugin": agent.version}}},
        }
        archive.file(f"{cfg}/package-lock.json", json.dumps(lock).encode(), 0o644, uid, gid)
