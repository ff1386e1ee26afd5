"""The Nix side: every .nix file parses, the guest reads the one contract,
and vmctl's `nixos` image backend (vmctl.images.nixos) handles nix's answers.

Real Nix cannot evaluate or build the flake here (no nixpkgs, no network):
`nix flake check` runs in CI. These tests use Debian's `nix-instantiate`
for parsing, and a FAKE `nix` (a shell-script stand-in written by the
`fake_nix` fixture, named so in every test that uses it) for the backend's
error paths and its handling of `nix build --json`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import need
from vmctl import contract
from vmctl.errors import ConfigError, VMError
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
        raw["workspace"]["options"],
        raw["store"]["mountpoint"],
        f'"{raw["workspace"]["tag"]}"',
        f'"{raw["store"]["tag"]}"',
        f'"{raw["user"]["name"]}"',
        raw["network"]["guest_address"],
        raw["mirror"]["port"],
    ]
    return [str(v) for v in values]


@pytest.mark.parametrize("name", ["guest.nix", "opencode.nix", "claude.nix", "llm.nix"])
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


# --- vmctl.images.nixos against a FAKE nix ------------------------------------------


@pytest.fixture
def fake_nix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNix:
    """Install a FAKE `nix` (a shell script) as the only program on PATH.

    `fake_nix(body)` writes the script; every call appends its argv to
    `calls.log` next to it. Real Nix cannot build anything here.
    """
    bindir = tmp_path / "fake-nix-bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.delenv("VMCTL_FLAKE", raising=False)

    def install(body: str) -> Path:
        script = bindir / "nix"
        script.write_text(f'#!/bin/sh\necho "$*" >> {log}\n{body}\n')
        script.chmod(0o755)
        return log

    return install


def image_manifest(tmp_path: Path) -> Path:
    """A manifest in the flake's format, whose kernel, initrd and store exist."""
    out = tmp_path / "store"
    out.mkdir()
    (out / "bzImage").write_bytes(b"kernel")
    (out / "initrd").write_bytes(b"initrd")
    manifest = out / "vmctl-manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "format": "vmctl-image/1",
                "name": "nixos-agent",
                "system": "x86_64-linux",
                "kernel": str(out / "bzImage"),
                "initrd": str(out / "initrd"),
                "cmdline": "init=/nix/store/x-nixos-system/init console=ttyS0",
                "shares": [{"tag": "nix-store", "path": str(out), "readonly": True}],
                "contract": contract.raw()["version"],
                "features": ["opencode", "llm"],
            }
        )
    )
    return manifest


def test_fake_nix_missing_nix_is_one_clear_error(fake_nix: FakeNix, tmp_path: Path) -> None:
    assert nixos.nix_available(".") == "nix is not installed"
    with pytest.raises(VMError) as e:
        nixos.build_manifest(str(tmp_path), "agent-x86_64-linux")
    assert e.value.message == "nix is not installed"
    assert e.value.hint and "install Nix" in e.value.hint


def test_fake_nix_successful_build_feeds_the_image_loader(
    fake_nix: FakeNix, tmp_path: Path
) -> None:
    images = pytest.importorskip("vmctl.images.manifest")
    manifest = image_manifest(tmp_path)
    answer = json.dumps([{"drvPath": "/nix/store/x.drv", "outputs": {"out": str(manifest)}}])
    log = fake_nix(f"echo 'building /nix/store/x.drv...' >&2\necho '{answer}'")
    got = nixos.build_manifest("/src/vmctl", "agent-x86_64-linux")
    assert got == manifest
    argv = log.read_text().split()
    assert {"build", "--json", "--no-link"} <= set(argv)
    want = "/src/vmctl#nixosConfigurations.agent-x86_64-linux.config.system.build.vmctlManifest"
    assert argv[-1] == want
    image = images.load_manifest(got)
    assert (image.name, image.system) == ("nixos-agent", "x86_64-linux")
    assert image.kernel.read_bytes() == b"kernel"
    assert [s.tag for s in image.shares] == ["nix-store"] and image.shares[0].readonly
    assert image.features == ("opencode", "llm")


def test_fake_nix_output_folder_holds_manifest_json(fake_nix: FakeNix, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    fake_nix(f"""echo '[{{"outputs": {{"out": "{folder}"}}}}]'""")
    assert nixos.build_manifest(".", "agent-x86_64-linux") == folder / "manifest.json"


def test_fake_nix_failed_evaluation_shows_nix_last_lines(fake_nix: FakeNix) -> None:
    fake_nix(
        'i=0; while [ $i -lt 40 ]; do echo "trace line $i" >&2; i=$((i+1)); done\n'
        "echo \"error: undefined variable 'opencodee'\" >&2\nexit 1"
    )
    with pytest.raises(VMError) as e:
        nixos.build_manifest("/src/vmctl", "agent-x86_64-linux")
    assert "could not build" in e.value.message and "agent-x86_64-linux" in e.value.message
    details = e.value.details or ""
    assert details.splitlines()[-1] == "error: undefined variable 'opencodee'"
    assert "trace line 0\n" not in details and len(details.splitlines()) == nixos.TAIL_LINES


def test_fake_nix_unknown_configuration_suggests_config(fake_nix: FakeNix) -> None:
    fake_nix(
        "echo \"error: flake 'path:/src' does not provide attribute "
        "'nixosConfigurations.agent-riscv.config'\" >&2; exit 1"
    )
    with pytest.raises(VMError) as e:
        nixos.build_manifest("/src", "agent-riscv")
    assert "no NixOS configuration 'agent-riscv'" in e.value.message
    assert e.value.hint and "--config" in e.value.hint


def test_fake_nix_missing_linux_builder_on_a_mac_gets_the_builder_hint(fake_nix: FakeNix) -> None:
    fake_nix(
        "echo \"error: a 'aarch64-linux' with features {} is required to build "
        "'/nix/store/abc-initrd.drv', but I am a 'aarch64-darwin' with features {}\" >&2\n"
        "exit 1"
    )
    with pytest.raises(VMError) as e:
        nixos.build_manifest("/src", "agent-aarch64-linux")
    assert e.value.message == "no Linux builder to build agent-aarch64-linux"
    assert e.value.hint and "linux-builder" in e.value.hint


def test_fake_nix_build_without_json_answer_is_an_error(fake_nix: FakeNix) -> None:
    fake_nix("echo 'not json'")
    with pytest.raises(VMError, match="gave no output path"):
        nixos.build_manifest("/src", "agent-x86_64-linux")


def test_fake_nix_available_when_version_and_offline_eval_answer(fake_nix: FakeNix) -> None:
    log = fake_nix('[ "$1" = --version ] && echo "nix (Nix) 2.24.0"; echo \'["agent"]\'')
    assert nixos.nix_available("/src") is None
    calls = log.read_text().splitlines()
    assert calls[0] == "--version"
    assert "eval --offline" in calls[1] and "/src#nixosConfigurations" in calls[1]


def test_fake_nix_hanging_is_bounded(fake_nix: FakeNix) -> None:
    fake_nix(f'[ "$1" = --version ] && exit 0\nexec {SLEEP} 30')
    start = time.monotonic()
    reason = nixos.nix_available("/src", timeout=1)
    assert time.monotonic() - start < 10
    assert reason and "did not answer" in reason


def test_fake_nix_offline_eval_failure_is_the_reason(fake_nix: FakeNix) -> None:
    fake_nix(
        '[ "$1" = --version ] && exit 0\n'
        'echo "error: cannot fetch nixpkgs" >&2; echo "(use --show-trace)" >&2; exit 1'
    )
    # The error line is the reason, not nix's trailing advice.
    assert nixos.nix_available("/src") == "nix cannot evaluate /src offline: cannot fetch nixpkgs"


@pytest.mark.parametrize(
    ("flake", "config"),
    [("--impure", "agent-x86_64-linux"), ("a b", "agent"), (".", "x; rm"), (".", "a#b")],
)
def test_hostile_flake_or_config_is_refused_before_nix_runs(flake: str, config: str) -> None:
    with pytest.raises(ConfigError):
        nixos.build_manifest(flake, config)


def test_defaults_point_at_this_checkout_and_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMCTL_FLAKE", raising=False)
    assert nixos.default_flake() == str(ROOT)
    monkeypatch.setenv("VMCTL_FLAKE", "github:someone/fork")
    assert nixos.default_flake() == "github:someone/fork"
    assert nixos.default_config("arm64") == "agent-aarch64-linux"
    assert nixos.default_config("AMD64") == "agent-x86_64-linux"
    with pytest.raises(VMError):
        nixos.default_config("riscv64")


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
