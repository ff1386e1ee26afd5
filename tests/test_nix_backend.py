"""vmctl's `nixos` image backend (vmctl.images.nixos) against a FAKE nix.

The fake is a shell script on PATH answering as nix would (`--json` build
results, evaluation errors, a missing Linux builder, a hang), so every way
nix can answer is handled without Nix installed.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vmctl import contract
from vmctl.errors import ConfigError, VMError
from vmctl.images import nixos

ROOT = Path(__file__).resolve().parents[1]
SLEEP = shutil.which("sleep") or "/bin/sleep"  # the fake nix runs with PATH=its own folder
FakeNix = Callable[[str], Path]


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


def test_fake_nix_probe_is_remembered_until_the_flake_changes(
    fake_nix: FakeNix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMCTL_CACHE", str(tmp_path / "cache"))
    flake = tmp_path / "flake"
    flake.mkdir()
    (flake / "flake.nix").write_text("{ }")
    log = fake_nix('[ "$1" = --version ] && exit 0\necho \'["agent"]\'')
    assert nixos.nix_probe(str(flake)) is None
    assert nixos.nix_probe(str(flake)) is None
    assert len(log.read_text().splitlines()) == 2  # one probe: --version and eval
    (flake / "flake.nix").write_text("{ outputs = _: { }; }")
    assert nixos.nix_probe(str(flake)) is None
    assert len(log.read_text().splitlines()) == 4
    assert len(list((tmp_path / "cache" / "nix").glob("probe-*.json"))) == 1  # the old one went


def test_fake_nix_probe_that_timed_out_is_asked_again(
    fake_nix: FakeNix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(nixos, "nix_available", lambda flake: "`nix eval` did not answer in 5 s")
    fake_nix("exit 0")
    assert nixos.nix_probe("/src") == "`nix eval` did not answer in 5 s"
    monkeypatch.setattr(nixos, "nix_available", lambda flake: None)
    assert nixos.nix_probe("/src") is None


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
