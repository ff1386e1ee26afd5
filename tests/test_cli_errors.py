"""Bad input gets one clear line naming what to do, never a traceback.

Each case runs the real `vmctl` command line in a subprocess, as a user
would, and checks stderr's shape: `error: ...` first, a `hint:` where a
fix exists, and no Python traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, vmctl_cmd
from vmctl import contract


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
    from vmctl.images.choose import resolve_image
    from vmctl.vm import accel

    kernel = resolve_image("micro").kernel
    if accel.kvm_problem(str(qemu_bin), "x86_64", kernel) is None:
        pytest.skip("KVM works on this machine")
    ws = tmp_path / "ws"
    ws.mkdir()
    out = run("up", "-d", str(ws), "--ephemeral", "--detach", "--accel", "kvm", "--net", "none")
    assert_one_line(out, "KVM", "--accel")


def test_missing_folder(tmp_path: Path) -> None:
    out = run("up", "-d", str(tmp_path / "nope"), "--ephemeral", "--detach")
    assert_one_line(out, "nope")


def test_up_typos_are_named_before_model_or_image_work(tmp_path: Path) -> None:
    """A mistyped preset or accelerator is the error, not "no model" or a slow image probe."""
    out = run("up", "-d", str(tmp_path), "--policy", "lockd", "--detach")
    assert_one_line(out, "unknown policy preset 'lockd'", "locked, balanced, open")
    assert "model" not in out.stderr and not out.stdout
    out = run("up", "-d", str(tmp_path), "--accel", "fast", "--detach")
    assert_one_line(out, "--accel 'fast'", "tcg")
    out = run("up", "-d", str(tmp_path), "--model-endpoint", "nope", "--detach")
    assert_one_line(out, "invalid --model-endpoint 'nope'", "HOST:PORT")
    assert "image:" not in out.stderr
    out = run("up", "-d", str(tmp_path), "--share", "vfs", "--net", "none", "--detach")
    assert_one_line(out, "--share 'vfs'", "virtiofs")
    out = run("up", "-d", str(tmp_path), "--share", "virtiofs", "--review", "--net", "none")
    assert_one_line(out, "--review", "drop --share virtiofs")
    out = run("up", "-d", str(tmp_path), "--review", "--net", "none", "--disk-floor", "1000T")
    assert_one_line(out, "under the disk floor", "--disk-floor")  # before the copy spends more
    assert not list(Path(os.environ["VMCTL_HOME"]).glob("reviews/*"))


def test_up_virtiofs_on_an_image_without_it_is_refused(tmp_path: Path, qemu_bin: Path) -> None:
    """An image whose guest cannot mount virtio-fs: one line before QEMU, never a 9p fallback."""
    img = tmp_path / "img"
    img.mkdir()
    (img / "vmlinux").write_bytes(b"\x7fELF")
    (img / "initrd").write_bytes(b"")
    manifest = {"format": "vmctl-image/1", "contract": contract.raw()["version"], "name": "old",
                "system": "x86_64-linux", "kernel": "vmlinux", "initrd": "initrd",
                "cmdline": "quiet", "transports": ["9p"]}  # fmt: skip
    (img / "manifest.json").write_text(json.dumps(manifest))
    ws = tmp_path / "ws"
    ws.mkdir()
    out = run("up", "-d", str(ws), "--share", "virtiofs", "--image", str(img / "manifest.json"),
              "--net", "none", "--accel", "tcg", "--ephemeral")  # fmt: skip
    assert_one_line(out, "--share virtiofs: the image's guest cannot mount virtio-fs", "--share 9p")
    assert not list(Path(os.environ["VMCTL_HOME"]).glob("instances/*"))


def test_up_with_a_busy_host_port_is_one_line(tmp_path: Path, qemu_bin: Path) -> None:
    """`-p` on a port a host program listens on: named before QEMU, not QEMU's -netdev dump."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run(
            "up", "-d", str(tmp_path), "--name", "busy", "--model-endpoint", "127.0.0.1:1",
            "--model", "m", "-p", f"{port}:80", "--detach", env={"VMCTL_QUIET": "1"},
        )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"error: -p {port}:...: host port {port} is already in use" in out.stderr
    assert "hint: choose a free host port" in out.stderr
    assert "qemu-system" not in out.stderr
    assert not (Path(os.environ["VMCTL_HOME"]) / "instances" / "busy").exists()


def test_system_credential_and_vmctl_folders_refused(tmp_path: Path) -> None:
    """A guest or client writing /etc, ~/.ssh or vmctl's image and tool cache is refused."""
    home = tmp_path / "home"
    (home / ".ssh" / "keys").mkdir(parents=True)
    cache = tmp_path / "cache"
    (cache / "tools").mkdir(parents=True)
    env = {"HOME": str(home), "VMCTL_CACHE": str(cache)}
    for bad in ("/etc", "/usr/lib", str(home / ".ssh" / "keys"), str(cache / "tools")):
        out = run("up", "-d", bad, "--net", "none", "--detach", env=env)
        assert_one_line(out, "refusing workspace", "project folder")
    out = run("run", "shell", "-w", "/etc", "--", "true", env=env)
    assert_one_line(out, "refusing workspace")
    (tmp_path / "proj").mkdir()  # an ordinary folder next to them is still fine
    from vmctl.sandbox.launch import check_workspace

    assert check_workspace(tmp_path / "proj") == (tmp_path / "proj").resolve()


def test_workspace_home_refused() -> None:
    out = run("sandbox", "exec", "shell", "-w", str(Path.home()), "--", "true")
    assert_one_line(out)


def test_stop_unknown_server() -> None:
    out = run("stop", "nosuch")
    assert_one_line(out, "vmctl ls")
    assert "stopping" not in out.stderr


def test_down_unknown_guest_is_one_line() -> None:
    out = run("down", "nosuch")
    assert_one_line(out, "no instance named 'nosuch'", "vmctl ls")
    assert "stopping" not in out.stderr


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


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--ctx-size", "-5"), "--ctx-size"),
        (("--ctx-size", "99999999999"), "--ctx-size"),
        (("--port", "0"), "--port"),
        (("--port", "70000"), "--port"),
        (("--name", "../x"), "--name"),
    ],
)
def test_serve_options_checked_before_anything_starts(args: tuple[str, ...], option: str) -> None:
    # No llama-server is needed: the options are refused before it is even looked for.
    out = run("serve", *args, env={"VMCTL_LLAMA_SERVER": "/nonexistent/llama-server"})
    assert_one_line(out, option)
    assert not list(Path(os.environ["VMCTL_HOME"]).glob("servers/*"))


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--mem", "5"), "--mem"),
        (("--cpus", "0"), "--cpus"),
        (("-p", "0:80"), "-p"),
        (("--timeout", "-5"), "--timeout"),
        (("--disk-floor", "lots"), "--disk-floor"),
    ],
)
def test_up_options_name_the_option(tmp_path: Path, args: tuple[str, ...], option: str) -> None:
    out = run("up", "-d", str(tmp_path), "--net", "none", *args)
    assert_one_line(out, option)
    assert not list(Path(os.environ["VMCTL_HOME"]).glob("instances/*"))
