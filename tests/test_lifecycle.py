"""The shutdown ladder and reaping against fake peers (seconds, not minutes).

A `FakeGuest` stands in for QEMU (a `sleep` process) and answers QMP
through a fake monitor; vmctl's real `Instance` and `reap` drive them.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.guest import FakeGuest, stand_in_qemu
from vmctl import events, paths
from vmctl.procs import ProcessRef
from vmctl.vm import instance
from vmctl.vm.spec import InstanceRecord


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[list[FakeGuest]]:
    made: list[FakeGuest] = []
    yield made
    for g in made:
        g.close()


def _guest(guests: list[FakeGuest], tmp_path: Path, name: str, **kw: object) -> FakeGuest:
    g = FakeGuest(name, tmp_path, **kw)  # type: ignore[arg-type]
    guests.append(g)
    return g


def told(name: str) -> list[tuple[str, str | None]]:
    """The guest's lifecycle lines (`vmctl logs NAME`): (action, reason)."""
    found = events.read_file(events.subject_file(paths.events_dir(), "guest", name))
    return [(e.action, e.reason) for e in found if e.kind == "lifecycle"]


def _gone(g: FakeGuest, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while g.reap() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return g.reap() is not None


# --- the shutdown ladder --------------------------------------------------------------


def test_powerdown_is_enough_for_a_guest_that_powers_off(
    guests: list[FakeGuest], tmp_path: Path
) -> None:
    g = _guest(guests, tmp_path, "polite")
    instance.down("polite")
    assert _gone(g)
    assert g.qmp.commands == ["qmp_capabilities", "query-status", "system_powerdown"]
    assert g.paths.meta.exists() and not g.paths.qmp.exists()  # persistent: folder kept
    assert told("polite") == [("down", "stopped")]
    assert instance.reap() == [] and told("polite") == [("down", "stopped")]  # not a crash


def test_a_paused_guest_is_continued_to_power_off_but_one_the_floor_paused_is_quit(
    guests: list[FakeGuest], tmp_path: Path
) -> None:
    g = _guest(guests, tmp_path, "paused")
    g.qmp.status = "paused"  # by someone else: it needs to run to act on the button
    instance.down("paused")
    assert _gone(g)
    assert g.qmp.commands == ["qmp_capabilities", "query-status", "cont", "system_powerdown"]
    g = _guest(guests, tmp_path, "floored")
    g.qmp.status = "paused"
    g.paths.paused.touch()  # the disk floor's: continuing it would let it write past the floor
    g.paths.disk_floor.write_text('{"floor": 1, "free": 0, "paused": true}')
    instance.down("floored")
    assert _gone(g)
    assert g.qmp.commands == ["qmp_capabilities", "quit"]
    assert not g.paths.paused.exists() and not g.paths.disk_floor.exists()  # none outlives it


def test_a_down_from_elsewhere_is_said_once_and_a_stopped_guest_says_nothing(
    guests: list[FakeGuest], tmp_path: Path
) -> None:
    for name, ephemeral in (("twice", False), ("twicee", True)):
        g = _guest(guests, tmp_path, name, ephemeral=ephemeral)
        owner_view = instance.Instance.load(name)  # a foreground `vmctl up` holds this
        instance.down(name)  # `vmctl down` from another terminal
        assert _gone(g)
        owner_view.close()
        assert told(name) == [("down", "stopped")]
    instance.down("twice")  # already stopped: nothing ran, nothing to say
    assert told("twice") == [("down", "stopped")]


def test_quit_follows_an_ignored_powerdown(guests: list[FakeGuest], tmp_path: Path) -> None:
    g = _guest(guests, tmp_path, "deaf", ignores_powerdown=True)
    start = time.monotonic()
    instance.down("deaf", powerdown_timeout=0.5)
    assert _gone(g)
    assert g.qmp.commands[-2:] == ["system_powerdown", "quit"]
    assert time.monotonic() - start < 5


def test_kill_ends_a_qemu_whose_monitor_is_gone(
    guests: list[FakeGuest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = _guest(guests, tmp_path, "hung", ignores_powerdown=True)
    g.qmp.close()  # QMP unreachable: only the signal rungs are left
    monkeypatch.setattr(instance, "QUIT_TIMEOUT_S", 0.2)
    instance.down("hung", powerdown_timeout=0.2)
    assert _gone(g)


def test_ephemeral_guest_leaves_nothing(guests: list[FakeGuest], tmp_path: Path) -> None:
    g = _guest(guests, tmp_path, "tmp", ephemeral=True)
    instance.down("tmp")
    assert _gone(g) and not g.paths.root.exists()


# --- reaping --------------------------------------------------------------------------


def test_reap_stops_a_guest_whose_owner_died(guests: list[FakeGuest], tmp_path: Path) -> None:
    g = _guest(guests, tmp_path, "orphan", ephemeral=True, detached=False)
    owner = subprocess.Popen(["true"])
    owner.wait()
    record = InstanceRecord.read(g.paths.meta)
    dead_owner = ProcessRef(owner.pid, "gone")
    InstanceRecord(**{**record.__dict__, "owner": dead_owner}).write(g.paths.meta)
    assert instance.reap() == ["orphan"]
    assert _gone(g) and not g.paths.root.exists()
    assert told("orphan") == [("reap", "owner_died")]


def test_a_qemu_gone_without_down_is_reaped_once_and_said(
    guests: list[FakeGuest], tmp_path: Path
) -> None:
    gone = _guest(guests, tmp_path, "crashed", ephemeral=True)
    kept = _guest(guests, tmp_path, "crashedp")
    for g in (gone, kept):
        g.qemu.kill()
        g.qemu.wait()
    assert instance.reap() == ["crashed"]
    assert instance.reap() == []  # the persistent one is said once, not at every `ls`
    for name in ("crashed", "crashedp"):
        assert told(name) == [("reap", "qemu_exited")]


def test_reap_stops_a_stand_in_qemu_that_a_killed_owner_never_recorded(
    guests: list[FakeGuest], tmp_path: Path
) -> None:
    """`vmctl up` SIGKILLed between QEMU's fork and its record: milliseconds
    no test can aim at, so a stand-in runs where that QEMU would."""
    g = _guest(guests, tmp_path, "unrec", ephemeral=True, detached=False)
    owner = subprocess.Popen(["true"])
    owner.wait()
    record = InstanceRecord.read(g.paths.meta)
    dead = ProcessRef(owner.pid, "gone")
    InstanceRecord(**{**record.__dict__, "owner": dead, "qemu": None}).write(g.paths.meta)
    stray = stand_in_qemu(g.paths)
    elsewhere = stand_in_qemu(g.paths, cwd=tmp_path)  # the same -name in another folder
    try:
        time.sleep(0.2)  # both have exec'd
        ref = ProcessRef.of(stray.pid)
        assert instance.reap() == ["unrec"]
        assert not ref.alive()  # reaped by the ladder, which also collected its status
        assert elsewhere.poll() is None, "a process outside the guest's folder was signalled"
    finally:
        for p in (stray, elsewhere):
            p.kill()
            p.wait()


def test_reap_leaves_a_booting_guest_alone(guests: list[FakeGuest], tmp_path: Path) -> None:
    """Owner alive, QEMU not yet started (another `vmctl up` or an `ls` meanwhile)."""
    for name, ephemeral in (("booting", True), ("bootingp", False)):
        g = _guest(guests, tmp_path, name, ephemeral=ephemeral, detached=False)
        sidecar = subprocess.Popen(["sleep", "60"])
        record = InstanceRecord.read(g.paths.meta)
        changed = {"qemu": None, "sidecar": ProcessRef.of(sidecar.pid)}
        InstanceRecord(**{**record.__dict__, **changed}).write(g.paths.meta)
        try:
            assert instance.reap() == []
            assert g.paths.root.exists() and sidecar.poll() is None
            assert InstanceRecord.read(g.paths.meta).owner == record.owner
        finally:
            sidecar.kill()
            sidecar.wait()


def test_reap_keeps_a_live_owned_guest_and_a_stopped_persistent_one(
    guests: list[FakeGuest], tmp_path: Path
) -> None:
    live = _guest(guests, tmp_path, "owned", ephemeral=True, detached=False)  # owner: pytest
    stopped = _guest(guests, tmp_path, "kept")
    stopped.power_off()
    assert _gone(stopped)
    assert instance.reap() == []
    states = {i.name: i.state for i in instance.list_instances()}
    assert states == {"owned": "running", "kept": "stopped"}
    assert live.reap() is None
