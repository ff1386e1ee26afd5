"""Bad input gets one clear line naming what to do, never a traceback.

Each case runs the real `vmctl` command line in a subprocess, as a user
would, and checks stderr's shape: `error: ...` first, a `hint:` where a
fix exists, and no Python traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, vmctl_cmd


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        vmctl_cmd(*args),
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_one_line(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error: "), out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr


@pytest.mark.llama
def test_unknown_model(llama_server_bin: Path) -> None:
    out = run("serve", "qwen9.9-1t", "--port", str(free_port()))
    assert_one_line(out, "qwen9.9-1t", "vmctl models")


@pytest.mark.llama
def test_corrupt_gguf_never_reaches_llama_server(tmp_path: Path, llama_server_bin: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    out = run("serve", str(bad), "--port", str(free_port()))
    assert_one_line(out, "bad.gguf")
    # Nothing started: no server folder holds a log of a launch.
    assert not list(Path(os.environ["VMCTL_HOME"]).glob("servers/*/server.log"))


@pytest.mark.llama
def test_not_a_gguf_at_all(tmp_path: Path, llama_server_bin: Path) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, I am text\n")
    assert_one_line(run("serve", str(bad)), "GGUF")


def test_hostile_spec_refused() -> None:
    assert_one_line(run("pull", "../../org/repo:f.gguf"))
    assert_one_line(run("pull", "org/repo:../../evil.gguf"))


def test_missing_qemu(tmp_path: Path) -> None:
    """PATH without QEMU: `vmctl up` names the package to install."""
    ws = tmp_path / "ws"
    ws.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = run("up", "-d", str(ws), "--ephemeral", "--detach", env={"PATH": str(bin_dir)})
    assert_one_line(out, "qemu")


@pytest.mark.qemu
def test_forced_kvm_when_kvm_is_unusable(tmp_path: Path, qemu_bin: Path) -> None:
    """These machines have a /dev/kvm that fails; `--accel kvm` must say so in one line."""
    from vmctl.images import manifest
    from vmctl.vm import accel

    kernel = manifest.resolve_image("micro").kernel
    if accel.kvm_problem(str(qemu_bin), "x86_64", kernel) is None:
        pytest.skip("KVM works on this machine")
    ws = tmp_path / "ws"
    ws.mkdir()
    out = run("up", "-d", str(ws), "--ephemeral", "--detach", "--accel", "kvm", "--net", "none")
    assert_one_line(out, "KVM", "--accel")


def test_missing_folder(tmp_path: Path) -> None:
    out = run("up", "-d", str(tmp_path / "nope"), "--ephemeral", "--detach")
    assert_one_line(out, "nope")


def test_workspace_home_refused() -> None:
    out = run("sandbox", "exec", "shell", "-w", str(Path.home()), "--", "true")
    assert_one_line(out)


def test_stop_unknown_server() -> None:
    assert_one_line(run("stop", "nosuch"), "vmctl ls")


@pytest.mark.llama
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bwrap is Linux-only")
def test_sandbox_unavailable_never_runs_unconfined(tmp_path: Path, llama_server_bin: Path) -> None:
    """No bwrap on PATH (and no fallback): serve refuses instead of running unsandboxed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = run(
        "serve",
        "--port",
        str(free_port()),
        env={"PATH": str(bin_dir), "VMCTL_LLAMA_SERVER": str(llama_server_bin)},
    )
    assert_one_line(out, "bwrap")
