"""The Nix side: every .nix file parses and the guest reads the one contract
(vmctl's `nixos` image backend against a fake nix: test_nix_backend.py).

Real Nix cannot evaluate or build the flake here (no nixpkgs, no network):
`nix flake check` runs in CI. These tests use Debian's `nix-instantiate`
for parsing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import need
from vmctl import contract
from vmctl.images import nixos

ROOT = Path(__file__).resolve().parents[1]
MODULES = ROOT / "nixos-modules"
SKIP_DIRS = {".git", ".venv", "node_modules", "build", "result"}
#: `fake_nix(body)` installs a fake `nix` running `body`; returns its call log.
FakeNix = Callable[[str], Path]
SLEEP = shutil.which("sleep") or "/bin/sleep"  # the fake nix runs with PATH=its own folder


def nix_files() -> list[Path]:
    return sorted(
        p for p in ROOT.rglob("*.nix") if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)
    )


def code_of(path: Path) -> str:
    """A .nix file without its comments (a string holding '#' is rare here)."""
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in path.read_text().splitlines())


# --- every .nix file parses --------------------------------------------------


def test_the_flake_files_exist() -> None:
    for rel in ("flake.nix", "nixos-modules/guest.nix", "nix/smoke-test.nix", "nix/package.nix"):
        assert (ROOT / rel).is_file(), rel


@pytest.mark.parametrize("path", nix_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nix_file_parses(path: Path) -> None:
    need(shutil.which("nix-instantiate") is not None, "nix-instantiate (Debian nix-bin) missing")
    r = subprocess.run(
        ["nix-instantiate", "--parse", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr


# --- one guest contract ------------------------------------------------------


def contract_path_in(nix_file: Path) -> Path:
    m = re.search(r"builtins\.readFile\s+(\S*guest-contract\.json)", nix_file.read_text())
    assert m, f"{nix_file.name} does not read guest-contract.json"
    return (nix_file.parent / m.group(1)).resolve()


def contract_literals() -> list[str]:
    """Values the guest must take from the JSON, never spell out itself."""
    raw = contract.raw()
    console = raw["console"]
    values = [
        console["boot_marker"],
        console["ready_marker"],
        console["poweroff_marker"],
        console["exec_port"],
        *console["log_device"].values(),
        raw["fw_cfg"]["prefix"],
        *(f.name for f in contract.fw_cfg_files()),
        *raw["kernel_cmdline"].values(),
        raw["workspace"]["mountpoint"],
        *(t.options for t in contract.transports().values()),
        raw["store"]["mountpoint"],
        f'"{raw["workspace"]["tag"]}"',
        f'"{raw["store"]["tag"]}"',
        f'"{raw["user"]["name"]}"',
        raw["network"]["guest_address"],
        raw["mirror"]["port"],
    ]
    return [str(v) for v in values]


@pytest.mark.parametrize(
    "name", ["guest.nix", "opencode.nix", "claude.nix", "codex.nix", "llm.nix"]
)
def test_guest_modules_read_the_one_contract_and_copy_none_of_it(name: str) -> None:
    path = MODULES / name
    text = code_of(path)
    if name == "guest.nix":
        assert "builtins.fromJSON" in text
        assert contract_path_in(path) == ROOT / "orchestrator/vmctl/data/guest-contract.json"
    else:
        assert "config.vmctl.guest.contract" in text
    copies = [v for v in contract_literals() if v in text]
    assert copies == [], f"{name} hard-codes contract values {copies}"


def test_claude_module_allows_only_claude_code_as_unfree() -> None:
    text = code_of(MODULES / "claude.nix")
    predicates = re.findall(r"allowUnfreePredicate[^;]*?\[([^\]]*)\]", text, re.S)
    assert [p.split() for p in predicates] == [['"claude-code"']]
    assert "allowUnfree =" not in text and 'mkPackageOption pkgs "claude-code"' in text
    assert "./claude.nix" in code_of(MODULES / "default.nix")


def test_smoke_test_takes_markers_and_names_from_the_contract() -> None:
    path = ROOT / "nix/smoke-test.nix"
    assert contract_path_in(path) == ROOT / "orchestrator/vmctl/data/guest-contract.json"
    copies = [v for v in contract_literals() if v in code_of(path)]
    assert copies == [], copies


# The NixOS test driver type-checks (mypy) the test script before any VM
# starts; this renders it the way Nix would and runs the same check against
# a stub of the driver's Machine API (only the methods the script uses).
MACHINE_STUB = """
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
class Machine:
    state_dir: Path
    def start(self, allow_reboot: bool = False) -> None: pass
    def wait_for_console_text(self, regex: str, timeout: int | None = None) -> None: pass
    def wait_for_unit(self, unit: str, user: str | None = None, timeout: int = 900) -> None: pass
    def succeed(self, *commands: str, timeout: int | None = None) -> str: return ""
    def fail(self, *commands: str, timeout: int | None = None) -> str: return ""
    def send_monitor_command(self, command: str) -> str: return ""
    def wait_for_shutdown(self) -> None: pass
@contextmanager
def subtest(name: str) -> Iterator[None]:
    yield
agent: Machine
"""


def rendered_smoke_script() -> str:
    """nix/smoke-test.nix's testScript with its `${...}` filled in as Nix would."""
    import textwrap

    text = (ROOT / "nix/smoke-test.nix").read_text()
    body = text[text.index("testScript = ''") + len("testScript = ''") : text.rindex("'';")]
    raw = contract.raw()
    files = ",\n".join(
        f'("{f.name.removeprefix(raw["fw_cfg"]["prefix"])}", "{f.dest}", "{f.owner}", "{f.mode}")'
        for f in contract.fw_cfg_files()
    )
    net = raw["network"]
    fixed = {
        "filesPy": files,
        "expected": "/nix/store/x-vmctl-expected-agent-files",
        "model": "smoke-model",
        "baseUrl": f"http://{net['model_host']}:{net['model_port']}/v1",
        "toString (net.model_port + 1)": str(net["model_port"] + 1),
        "wsFs": contract.transports()[contract.default_transport()].fstype,
    }
    short = {"contract": "", "ws": "workspace.", "net": "network."}

    def value(m: re.Match[str]) -> str:
        expr = m.group(1)
        if expr in fixed:
            return fixed[expr]
        head, _, rest = expr.partition(".")
        node: object = raw
        for key in (short[head] + rest).strip(".").split("."):
            assert isinstance(node, dict), expr
            node = node[key]
        return str(node)

    # Nix strips the ''-string's indentation before interpolating.
    return re.sub(r"\$\{([^}]+)\}", value, textwrap.dedent(body))


def test_smoke_test_script_type_checks_like_the_test_driver(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    script = tmp_path / "test_script.py"
    script.write_text(MACHINE_STUB + rendered_smoke_script())
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-implicit-optional", "--no-error-summary", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_python_reads_the_same_contract_file_as_guest_nix() -> None:
    nix_side = json.loads(contract_path_in(MODULES / "guest.nix").read_text())
    assert nix_side == contract.raw()


def test_nix_parses_the_contract_like_python() -> None:
    need(shutil.which("nix-instantiate") is not None, "nix-instantiate (Debian nix-bin) missing")
    path = contract_path_in(MODULES / "guest.nix")
    expr = f"builtins.fromJSON (builtins.readFile {path})"
    r = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "-E", expr],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == contract.raw()


def test_guest_manifest_has_exactly_the_keys_the_image_loader_reads() -> None:
    images = pytest.importorskip("vmctl.images.manifest")
    text = code_of(MODULES / "guest.nix")
    block = text[text.index("manifest = {") : text.index("in\n{")]
    keys = set(re.findall(r"^    (\w+) =", block, re.MULTILINE))
    assert keys == images._KEYS
    assert f'format = "{images.FORMAT}"' in block


def test_guest_runs_the_shared_exec_agent() -> None:
    text = code_of(MODULES / "guest.nix")
    m = re.search(r"\$\{(\.\./orchestrator/vmctl/data/guest/vmctl-exec-agent\.sh)\}", text)
    assert m, "guest.nix must run the shared exec agent script"
    assert (MODULES / m.group(1)).resolve().is_file()


def test_flake_declares_the_agreed_outputs() -> None:
    """Structure only: evaluating the flake needs nixpkgs (`nix flake check` in CI)."""
    text = code_of(ROOT / "flake.nix")
    assert re.search(r'nixpkgs\.url = "github:NixOS/nixpkgs/nixos-\d\d\.\d\d"', text)
    for system in ("x86_64-linux", "aarch64-linux", "aarch64-darwin", "x86_64-darwin"):
        assert f'"{system}"' in text
    for needle in (
        "nixosModules = {",
        "guest = ./nixos-modules/guest.nix;",
        "opencode = ./nixos-modules/opencode.nix;",
        "llm = ./nixos-modules/llm.nix;",
        "claude = ./nixos-modules/claude.nix;",
        "codex = ./nixos-modules/codex.nix;",
        "default = ./nixos-modules/default.nix;",
        '"agent-${system}"',
        "inherit mkAgent",
        "agent-image =",
        "config.system.build.vmctlManifest",
        "unit =",
        "smoke = pkgs.testers.runNixOSTest",
        "apps =",
        "devShells =",
        "formatter =",
        '-m "not qemu and not llama and not slow and not network"',
    ):
        assert needle in text, needle
    assert nixos.MANIFEST_ATTR in text
