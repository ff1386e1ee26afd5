"""What `vmctl ls` and `status` tell the user about a persistent guest after `down`.

A stopped persistent guest keeps its folder; the listing must say it is
stopped (not "running" with a dead pid) until `vmctl rm` removes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need
from vmctl.images import choose

pytestmark = pytest.mark.qemu
VMCTL = [sys.executable, "-m", "vmctl"]


def vmctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VMCTL, *args], env=env, capture_output=True, text=True, timeout=180, check=False
    )


def test_down_guest_is_listed_as_stopped_until_rm(vmctl_home: Path, tmp_path: Path) -> None:
    need(bool(subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).stdout), "qemu")
    manifest = choose.resolve_image("micro").path
    env = {**os.environ, "VMCTL_QUIET": "1"}
    ws = tmp_path / "ws"
    ws.mkdir()
    up = [
        "up",
        "-d",
        str(ws),
        "--name",
        "keep",
        "--image",
        str(manifest),
        "--net",
        "none",
        "--accel",
        "tcg",
    ]
    r = vmctl(env, *up, "--detach", "--timeout", "150")
    try:
        assert r.returncode == 0, r.stderr
        row = [ln for ln in vmctl(env, "ls").stdout.splitlines() if " keep " in ln]
        assert row and "running" in row[0], row
    finally:
        assert vmctl(env, "down", "keep").returncode == 0
    listed = vmctl(env, "ls", "--all").stdout
    row = [ln for ln in listed.splitlines() if " keep " in ln]
    assert row and "stopped" in row[0] and "running" not in row[0], listed
    data = json.loads(vmctl(env, "status", "keep", "--json").stdout)
    assert data["running"] is False and data["state"] == "stopped"
    assert vmctl(env, "rm", "keep").returncode == 0
    assert " keep " not in vmctl(env, "ls", "--all").stdout
