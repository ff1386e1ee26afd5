"""`vmctl exec` sessions, `vmctl shell` and the foreground console, on a real guest (TCG).

One foreground `vmctl up` on a pexpect terminal serves the module (one
boot): the exec and shell tests run beside its console, and the last test
types `exit` at that console, which stops the guest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need
from vmctl.images import choose

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.qemu
_SCRIPT = Path(sys.executable).with_name("vmctl")  # the console script: exec's fast path
VMCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "vmctl"]
PROMPT = r"/workspace \$ "


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    need(bool(subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).stdout), "qemu")
    cache = os.environ.get("VMCTL_CACHE") or str(Path.home() / ".local/state/vmctl/cache")
    home = tmp_path_factory.mktemp("sh", numbered=True)
    os.environ["VMCTL_CACHE"] = cache
    e = {**os.environ, "VMCTL_HOME": str(home), "VMCTL_CACHE": cache}
    e["TEST_MANIFEST"] = str(choose.resolve_image("micro").path)
    yield e
    for root in (home / "instances").glob("*"):
        subprocess.run([*VMCTL, "down", root.name], env=e, timeout=60, check=False)


@pytest.fixture(scope="module")
def fg(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """`vmctl up` in the foreground on a terminal; its console prompt shows unasked."""
    ws = tmp_path_factory.mktemp("ws")
    env["TEST_WS"] = str(ws)
    args = ["up", "-d", str(ws), "--name", "fg", "--image", env["TEST_MANIFEST"]]
    child = pexpect.spawn(
        VMCTL[0], [*VMCTL[1:], *args, "--net", "none", "--timeout", "300"], env=env, timeout=330
    )
    try:
        child.expect("attached to fg's console")
        child.expect(PROMPT, timeout=30)  # nothing typed: the prompt is there at once
        yield child
    finally:
        if child.isalive():
            subprocess.run([*VMCTL, "down", "fg"], env=env, timeout=60, check=False)
        child.close(force=True)


def vmctl(env: dict[str, str], *args: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*VMCTL, *args], env=env, input=data, capture_output=True, timeout=120, check=False
    )


def test_exec_forwards_stdin_and_keeps_stderr_apart(fg: object, env: dict[str, str]) -> None:
    r = vmctl(env, "exec", "fg", "--", "cat", data=b"data\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"data\n", b"")
    r = vmctl(env, "exec", "fg", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    assert vmctl(env, "exec", "fg", "--", "sh", "-c", "kill -9 $$").returncode == 137
    blob = os.urandom(400_000)
    r = vmctl(env, "exec", "fg", "--", "sh", "-c", "tee blob.bin | sha256sum", data=blob)
    assert r.returncode == 0 and r.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()
    assert (Path(env["TEST_WS"]) / "blob.bin").read_bytes() == blob  # on the host, whole
    r = vmctl(env, "exec", "fg", "--", "tty")  # no -t: pipes, not a terminal
    assert r.returncode == 1 and b"not a tty" in r.stdout


def test_exec_t_runs_on_a_guest_pty(fg: object, env: dict[str, str]) -> None:
    cmd = "tty; stty size; read x; echo got:$x; exit 5"
    child = pexpect.spawn(
        VMCTL[0], [*VMCTL[1:], "exec", "-t", "fg", "--", "sh", "-c", cmd],
        env=env, timeout=60, dimensions=(33, 101),
    )  # fmt: skip
    try:
        child.expect("/dev/pts/")
        child.expect("33 101")
        child.sendline("hi")
        child.expect("got:hi")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 5


def test_shell_is_a_login_shell_in_the_workspace(fg: object, env: dict[str, str]) -> None:
    child = pexpect.spawn(
        VMCTL[0], [*VMCTL[1:], "shell", "fg"], env=env, timeout=60, encoding="utf-8"
    )
    try:
        child.expect(PROMPT)
        child.sendline("id -un; echo home=$HOME; echo ok-$((6 * 7))")
        child.expect("ok-42")
        assert "agent" in (child.before or "") and "home=/home/agent" in (child.before or "")
        child.sendline("sleep 50")
        child.sendcontrol("c")  # raw mode: Ctrl-C reaches the guest's shell, not vmctl
        child.expect(PROMPT, timeout=20)
        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 3


def test_exit_at_the_foreground_console_stops_the_guest(fg: object, env: dict[str, str]) -> None:
    child = fg
    assert isinstance(child, pexpect.spawn)
    child.sendline("echo console-$((6 * 7))")
    child.expect("console-42")
    child.sendline("exit")
    child.expect("the console shell exited: stopping fg", timeout=60)
    child.expect(pexpect.EOF, timeout=120)
    child.close()
    assert child.exitstatus == 0
    assert not (Path(env["VMCTL_HOME"]) / "instances" / "fg" / "exec0.in").exists()
