"""Helpers for the real-guest tests (test_vm, test_vm_failures): a private
VMCTL_HOME per module with the shared image cache, and the `vmctl` CLI run
the way users run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need
from vmctl.images.choose import resolve_image
from vmctl.procs import ProcessRef
from vmctl.vm import virtiofs
from vmctl.vm.console import wait_for_marker

VMCTL = [sys.executable, "-m", "vmctl"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private VMCTL_HOME for the module; the image cache is shared (built once)."""
    need(bool(subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).stdout), "qemu")
    cache = os.environ.get("VMCTL_CACHE") or str(Path.home() / ".local/state/vmctl/cache")
    home = tmp_path_factory.mktemp("vm", numbered=True)
    e = {**os.environ, "VMCTL_HOME": str(home), "VMCTL_CACHE": cache, "VMCTL_QUIET": "1"}
    old = {k: os.environ.get(k) for k in ("VMCTL_HOME", "VMCTL_CACHE")}
    os.environ["VMCTL_CACHE"] = cache
    try:
        manifest = resolve_image("micro").path
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    e["TEST_MANIFEST"] = str(manifest)
    yield e
    for root in (home / "instances").glob("*"):  # kill anything a failed test left
        subprocess.run([*VMCTL, "down", root.name], env=e, timeout=60, check=False)


def vmctl(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VMCTL, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def up_args(env: dict[str, str], ws: Path, name: str, *extra: str) -> list[str]:
    return ["up", "-d", str(ws), "--name", name, "--image", env["TEST_MANIFEST"], *extra]


def instance_dir(env: dict[str, str], name: str) -> Path:
    return Path(env["VMCTL_HOME"]) / "instances" / name


def no_trace(env: dict[str, str], name: str, pid: int, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and ProcessRef.of(pid).alive():
        time.sleep(0.1)
    assert not ProcessRef.of(pid).alive(), "QEMU still running"


def foreground_up(
    env: dict[str, str], ws: Path, name: str, *extra: str
) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [*VMCTL, *up_args(env, ws, name, "--ephemeral", "--net", "none", *extra)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    log = instance_dir(env, name) / "console.log"
    try:
        wait_for_marker(
            log, "VMCTL-READY", 90, abort=lambda: None if proc.poll() is None else "exited"
        )
        meta = json.loads((instance_dir(env, name) / "instance.json").read_text())
    except BaseException:
        proc.kill()
        raise
    return proc, meta["qemu"]["pid"]


def daemons_of(ws: Path) -> list[int]:
    """Pids of virtio-fs daemons serving `ws` (from /proc: whoever started them)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if f"source={ws}".encode() in args:
            found.append(int(cmdline.parent.name))
    return found


def share_args(share: str) -> tuple[str, ...]:
    if share == "virtiofs":
        need(virtiofs.find_daemon() is not None, "virtiofsd (qemu-system-common)")
    return ("--share", share)
