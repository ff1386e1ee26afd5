"""Real guests under TCG that fail or are interrupted: Ctrl-C, SIGKILL, a
guest never ready, a kernel panic, QEMU refusing its arguments, a virtio-fs
daemon that dies, a missing workspace. Each boots its own guest through the
`vmctl` CLI and checks that nothing is left and the user reads one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guests import (
    daemons_of,
    env,
    foreground_up,
    instance_dir,
    no_trace,
    share_args,
    up_args,
    vmctl,
)
from vmctl.procs import ProcessRef

pytestmark = pytest.mark.qemu
__all__ = ["env"]  # the module-scoped fixture, used by name


@pytest.mark.parametrize("share", ["9p", "virtiofs"])
def test_ctrl_c_leaves_nothing(env: dict[str, str], tmp_path: Path, share: str) -> None:
    proc, pid = foreground_up(env, tmp_path, "intr", *share_args(share))
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        proc.kill()
        ProcessRef.of(pid).terminate(2)
    no_trace(env, "intr", pid, 2)
    assert not instance_dir(env, "intr").exists()
    assert daemons_of(tmp_path) == []


@pytest.mark.parametrize("share", ["9p", "virtiofs"])
def test_sigkill_of_vmctl_leaves_no_qemu_and_next_run_reaps(
    env: dict[str, str], tmp_path: Path, share: str
) -> None:
    proc, pid = foreground_up(env, tmp_path, "killed", *share_args(share))
    ref = ProcessRef.of(pid)
    try:
        if share == "virtiofs":
            assert len(daemons_of(tmp_path)) >= 1  # the daemon, in its own pid namespace
        proc.kill()
        proc.wait(5)
        no_trace(env, "killed", pid, 5)
        deadline = time.monotonic() + 5
        while daemons_of(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemons_of(tmp_path) == [], "a virtio-fs daemon outlived vmctl"
    finally:
        ref.terminate(2)
    assert instance_dir(env, "killed").exists()
    code = "from vmctl.vm import instance; print([i.name for i in instance.list_instances()])"
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert "killed" not in r.stdout and r.returncode == 0, r.stderr
    assert not instance_dir(env, "killed").exists()


def test_guest_that_never_becomes_ready_fails_clearly(env: dict[str, str], tmp_path: Path) -> None:
    start = time.monotonic()
    args = up_args(
        env, tmp_path, "stuck", "--ephemeral", "--net", "none", "--timeout", "8", "--detach"
    )
    r = vmctl(env, *args, "--", "-append", "console=ttyS0 rdinit=/bin/sh", timeout=60)
    assert r.returncode == 1
    assert "error: guest stuck did not become ready within 8 s" in r.stderr
    assert time.monotonic() - start < 40
    assert not instance_dir(env, "stuck").exists()


def test_missing_workspace_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    r = vmctl(env, *up_args(env, tmp_path / "nope", "nows", "--detach"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: workspace") and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_kernel_panic_fails_fast_with_the_panic_line(env: dict[str, str], tmp_path: Path) -> None:
    """The console is watched from the first line: a panic ends the wait at once."""
    start = time.monotonic()
    args = up_args(
        env, tmp_path, "panics", "--ephemeral", "--net", "none", "--timeout", "100", "--detach"
    )
    # No init anywhere: every kernel panics (one with a block layer at mounting a root).
    boot = "console=ttyS0 rdinit=/nonexistent init=/nonexistent"
    r = vmctl(env, *args, "--", "-append", boot, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "error: guest panics failed to boot" in r.stderr
    assert "Kernel panic" in r.stderr
    assert time.monotonic() - start < 60
    assert not instance_dir(env, "panics").exists()


def test_qemu_refusing_its_arguments_is_named_with_its_own_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    """QEMU exits before it takes the console vmctl connected: its status and error, not a reset."""
    args = up_args(env, tmp_path, "badarg", "--ephemeral", "--net", "none", "--detach")
    r = vmctl(env, *args, "--", "-no-such-option", timeout=60)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "error: guest badarg failed to boot: QEMU exited with status 1" in r.stderr, r.stderr
    assert "-no-such-option: invalid option" in r.stderr
    assert not instance_dir(env, "badarg").exists()
    # The sidecar started before QEMU; it went with the failed boot.
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(instance_dir(env, "badarg")).encode() in cmdline.read_bytes():
                left.append(cmdline.parent.name)
        except OSError:
            continue
    assert left == []


def test_a_stand_in_virtiofs_daemon_that_dies_is_named_and_nothing_is_left(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The daemon's own words reach the user, not only QEMU's "Connection refused".

    A stand-in daemon: the real one cannot be made to fail on cue once vmctl
    has checked the folder it serves.
    """
    fake = tmp_path / "virtiofsd"
    fake.write_text("#!/bin/sh\n# -o source=PATH\necho 'cannot serve this folder' >&2\nexit 1\n")
    fake.chmod(0o755)
    ws = tmp_path / "ws"
    ws.mkdir()
    args = up_args(env, ws, "vfsdead", "--ephemeral", "--detach", "--net", "none")
    r = vmctl({**env, "VMCTL_VIRTIOFSD": str(fake)}, *args, "--share", "virtiofs")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "error: guest vfsdead failed to boot" in r.stderr, r.stderr
    assert "virtiofsd: cannot serve this folder" in r.stderr, r.stderr
    assert not instance_dir(env, "vfsdead").exists()


def test_the_guest_log_tells_up_down_and_a_qemu_killed_from_outside(
    env: dict[str, str], tmp_path: Path
) -> None:
    args = up_args(env, tmp_path, "told", "--ephemeral", "--detach", "--net", "none")
    assert vmctl(env, *args).returncode == 0
    assert vmctl(env, "down", "told").returncode == 0
    assert vmctl(env, *args).returncode == 0
    pid = json.loads((instance_dir(env, "told") / "instance.json").read_text())["qemu"]["pid"]
    os.kill(pid, signal.SIGKILL)
    no_trace(env, "told", pid, 5)
    assert "told" not in vmctl(env, "ls").stdout  # reaped on the way
    log = Path(env["VMCTL_HOME"]) / "events" / "guest-told.jsonl"
    said = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [(e["action"], e.get("reason")) for e in said if e["kind"] == "lifecycle"]
    assert steps == [("up", "ready"), ("down", "stopped"), ("up", "ready"), ("reap", "qemu_exited")]
    assert "net none, share 9p, ready in" in said[0]["detail"]
    text = vmctl(env, "logs", "told").stdout
    assert "guest:told up (ready)" in text and "guest:told reap (qemu_exited)" in text
