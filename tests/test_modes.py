"""The workspace's x bits without a guest: QEMU's side emulated with the xattr it writes.

Under `security_model=mapped-xattr` QEMU 7.2 stores a guest's chmod (and the
mode of a file the guest creates) as `user.virtfs.mode`, the whole st_mode as
a little-endian u32, on a host file it created 0644. These tests write that
xattr themselves and check what vmctl.sidecars.modes makes of it, directly
and through the real sidecar process (the `settle` that `vmctl exec` sends).
"""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmctl import paths
from vmctl.procs import ProcessRef
from vmctl.sidecars import guestlaunch, modes
from vmctl.vm.execchan import ExecChannel, settle

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify")


def guest_chmod(path: Path, mode: int) -> None:
    """What QEMU does for a guest chmod (and for a file the guest creates)."""
    os.setxattr(path, modes.XATTR, struct.pack("<I", mode))


def guest_mode(path: Path) -> int:
    value: int = struct.unpack("<I", os.getxattr(path, modes.XATTR))[0]
    return value


def guest_made(path: Path, mode: int = 0o644) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(0o644)
    guest_chmod(path, stat.S_IFREG | mode)
    return path


def host_mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    (tmp_path / "ws").mkdir()
    return tmp_path / "ws"


@pytest.fixture
def rec(ws: Path) -> Iterator[modes.Reconciler]:
    lines: list[str] = []
    r = modes.Reconciler(str(ws), log=lines.append)
    r.scan(initial=True)
    yield r
    r.close()


def test_a_guest_chmod_reaches_the_host_file(ws: Path, rec: modes.Reconciler) -> None:
    host_made = ws / "run.sh"
    host_made.write_text("#!/bin/sh\n")  # made before the reconciler: no xattr
    host_made.chmod(0o644)
    mine = guest_made(ws / "g.sh")
    rec.drain()
    assert host_mode(mine) == 0o644
    guest_chmod(host_made, stat.S_IFREG | 0o755)
    guest_chmod(mine, stat.S_IFREG | 0o700)
    rec.drain()
    assert host_mode(host_made) == 0o755
    assert host_mode(mine) == 0o744  # only the x bits cross: the host keeps its r/w bits
    guest_chmod(mine, stat.S_IFREG | 0o600)
    rec.drain()
    assert host_mode(mine) == 0o644


def test_a_file_the_guest_creates_executable_is_executable_on_the_host(
    ws: Path, rec: modes.Reconciler
) -> None:
    (ws / "a" / "b").mkdir(parents=True)  # a new folder: watched, and what it holds checked
    guest_made(ws / "a" / "b" / "a.out", 0o755)
    rec.drain()
    assert host_mode(ws / "a" / "b" / "a.out") == 0o755
    later = guest_made(ws / "a" / "b" / "later", 0o775)  # now through the folder's own watch
    rec.drain()
    assert host_mode(later) == 0o755


def test_a_host_chmod_reaches_the_guests_mode_and_nothing_ping_pongs(
    ws: Path, rec: modes.Reconciler
) -> None:
    mine = guest_made(ws / "g.sh", 0o640)
    rec.drain()
    mine.chmod(0o755)
    rec.drain()
    assert guest_mode(mine) == stat.S_IFREG | 0o751  # file type and r/w bits kept
    assert host_mode(mine) == 0o755
    carried = rec.applied
    mine.chmod(0o644)
    rec.drain()
    assert guest_mode(mine) == stat.S_IFREG | 0o640
    rec.drain()
    assert rec.applied == carried + 1  # its own xattr write came back as an event: no change
    assert host_mode(mine) == 0o644


def test_no_setuid_and_nothing_for_special_files(ws: Path, rec: modes.Reconciler) -> None:
    suid = guest_made(ws / "suid")
    guest_chmod(suid, stat.S_IFREG | 0o6755)
    link = guest_made(ws / "link")  # a guest symlink is a regular file on the host
    guest_chmod(link, stat.S_IFLNK | 0o777)
    fifo = guest_made(ws / "fifo")
    guest_chmod(fifo, stat.S_IFIFO | 0o755)
    (ws / "dir").mkdir()
    guest_chmod(ws / "dir", stat.S_IFDIR | 0o700)
    rec.drain()
    assert suid.lstat().st_mode == stat.S_IFREG | 0o755
    assert link.lstat().st_mode == fifo.lstat().st_mode == stat.S_IFREG | 0o644
    assert (ws / "dir").lstat().st_mode == stat.S_IFDIR | 0o755


def test_symlinks_are_never_followed(ws: Path, tmp_path: Path, rec: modes.Reconciler) -> None:
    outside = guest_made(tmp_path / "outside", 0o755)
    (ws / "out-link").symlink_to(outside)
    rec.check(str(ws / "out-link"))
    rec.drain()
    assert host_mode(outside) == 0o644


def test_start_only_records_and_a_moved_folder_stays_watched(ws: Path) -> None:
    before = guest_made(ws / "before", 0o755)
    (ws / "d").mkdir()
    r = modes.Reconciler(str(ws), log=[].append)
    try:
        r.scan(initial=True)
        r.drain()
        assert host_mode(before) == 0o644  # `vmctl up` rewrites no mode
        guest_chmod(before, stat.S_IFREG | 0o644)
        (ws / "d").rename(ws / "e")
        r.drain()
        moved = guest_made(ws / "e" / "x", 0o755)
        r.drain()
        assert host_mode(moved) == 0o755
        assert sorted(r.dirs.values()) == [str(ws), str(ws / "e")]
    finally:
        r.close()


def test_the_watch_limit_is_logged_once(ws: Path) -> None:
    for d in ["a", "b", "c"]:
        (ws / d).mkdir()
    lines: list[str] = []
    r = modes.Reconciler(str(ws), limit=2, log=lines.append)
    try:
        r.scan(initial=True)
        assert len(r.dirs) == 2
        assert len(lines) == 1 and "watch limit" in lines[0]
    finally:
        r.close()


def test_exec_settles_through_the_real_sidecar(
    ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exec client asks; once answered, the guest's chmod is on the host."""
    monkeypatch.setenv("VMCTL_HOME", str(tmp_path / "h"))
    ip = paths.instance("box")
    paths.private_dir(ip.root)
    meta = {"name": "box", "qemu": ProcessRef.of(os.getpid()).to_json(), "owner": None}
    ip.meta.write_text(json.dumps(meta))
    assert ExecChannel.for_instance(ip.root, "box").sidecar == str(ip.sidecar)
    config = guestlaunch.SidecarConfig("box", str(ip.sidecar), str(ip.meta), workspace=str(ws))
    guestlaunch.write_config(ip.sidecar_config, config)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmctl.sidecars.guestpath", str(ip.sidecar_config)],
        env={**os.environ, "VMCTL_HOME": str(tmp_path / "h")},
    )
    try:
        for _ in range(200):
            if ip.sidecar.exists():
                break
            time.sleep(0.05)
        took = []
        for i in range(20):
            f = guest_made(ws / f"f{i}", 0o755)
            start = time.perf_counter()
            assert settle(str(ip.sidecar))
            took.append(time.perf_counter() - start)
            assert host_mode(f) == 0o755
        took.sort()
        print(f"settle: median {took[10] * 1000:.2f} ms, max {took[-1] * 1000:.2f} ms")
        assert not settle(str(tmp_path / "none.sock"))  # no sidecar: ignored
    finally:
        proc.terminate()
        proc.wait(10)
