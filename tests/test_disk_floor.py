"""The workspace's disk floor (vmctl.sidecars.floor): a guest that would fill the
host's disk is paused, and continues once the space is back.

The guard's rules run against the fake QMP monitor (tests/fakes/qmp.py)
with the free space given; the user's
story runs a real micro guest under TCG writing into its workspace until
the real filesystem is under the floor.
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

from conftest import StubFactory
from fakes.qmp import FakeQMP
from guests import VMCTL, env, up_args, vmctl
from vmctl import paths
from vmctl.errors import ConfigError
from vmctl.sidecars import floor
from vmctl.vm.execchan import ExecChannel

__all__ = ["env"]  # the module-scoped fixture, used by name
MIB = 1 << 20


def test_sizes_parse_in_binary_units_and_bad_ones_name_the_fix() -> None:
    assert floor.parse_size("1G") == 1 << 30
    assert floor.parse_size("500M") == 500 * MIB
    assert floor.parse_size("2GiB") == 2 << 30
    assert floor.parse_size("4096") == 4096
    assert floor.parse_size("0") == 0
    for bad in ("lots", "-1G", "1.5G", "1X", ""):
        with pytest.raises(ConfigError) as e:
            floor.parse_size(bad)
        assert "--disk-floor" in e.value.message and "0 to turn it off" in (e.value.hint or "")


def test_the_default_floor_is_five_percent_at_most_one_gib(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    assert floor.default_floor(tmp_path) == min(1 << 30, int(st.f_blocks * st.f_frsize * 0.05))
    assert floor.resolve(tmp_path, 0) == 0
    with pytest.raises(ConfigError) as e:  # more than is free: refused before anything starts
        floor.resolve(tmp_path, floor.free_bytes(tmp_path) + (1 << 30))
    assert "under the disk floor" in e.value.message and "--disk-floor" in (e.value.hint or "")


def test_the_guard_pauses_below_the_floor_and_continues_past_the_margin(tmp_path: Path) -> None:
    mon = FakeQMP(tmp_path / "qmp.sock")
    said: list[tuple[str, str, dict[str, object]]] = []
    free = [900 * MIB]
    ipaths = paths.InstancePaths(tmp_path)
    guard = floor.Guard(
        str(tmp_path), 1 << 30, floor.qmp_switches(ipaths.qmp),
        lambda kind, action, **f: said.append((kind, action, f)), free=lambda _: free[0],
        state=ipaths.disk_floor, marker=ipaths.paused,
    )  # fmt: skip
    chan = ExecChannel.for_instance(tmp_path, "box")  # what `vmctl exec` looks at
    assert not chan.paused()
    guard.tick()
    assert mon.commands == ["qmp_capabilities", "stop"] and mon.status == "paused"
    assert chan.paused()  # `vmctl exec` says why it waits
    assert said[0][:2] == ("lifecycle", "pause") and said[0][2]["reason"] == "disk_floor"
    assert floor.describe(tmp_path / "disk-floor.json") == {
        "floor": 1 << 30, "free": 900 * MIB, "paused": True,
    }  # fmt: skip
    free[0] = (1 << 30) + 10 * MIB  # above the floor, inside the margin: no flapping
    guard.tick()
    assert mon.commands == ["qmp_capabilities", "stop"]
    free[0] = (1 << 30) + floor.RESUME_MARGIN
    guard.tick()
    guard.tick()
    assert [c for c in mon.commands if c != "qmp_capabilities"] == ["stop", "cont"]
    assert mon.status == "running" and not chan.paused()
    assert [a for _, a, _ in said] == ["pause", "resume"]
    assert floor.describe(tmp_path / "disk-floor.json")["paused"] is False  # type: ignore[index]


def test_a_guard_that_cannot_reach_qemu_tries_again_next_tick(tmp_path: Path) -> None:
    said: list[str] = []
    guard = floor.Guard(
        str(tmp_path), 1 << 30, floor.qmp_switches(tmp_path / "qmp.sock"),
        lambda kind, action, **f: said.append(action), free=lambda _: 0,
    )  # fmt: skip
    guard.tick()  # no monitor yet: nothing happened, nothing said
    assert said == [] and not guard.paused
    mon = FakeQMP(tmp_path / "qmp.sock")
    guard.tick()
    assert said == ["pause"] and mon.commands == ["qmp_capabilities", "stop"]


def test_a_switch_that_fails_never_takes_the_guard_down(tmp_path: Path) -> None:
    """The guard runs inside the guest's sidecar: an error there is "not now"."""

    def broken() -> bool:
        raise RuntimeError("no way to pause")

    said: list[str] = []
    guard = floor.Guard(
        str(tmp_path), 1 << 30, (broken, broken), lambda kind, action, **f: said.append(action),
        free=lambda _: 0,
    )  # fmt: skip
    guard.tick()
    assert said == [] and not guard.paused


# ---- the user's story, with a real guest ----


def test_bad_floors_are_one_line_before_any_guest(env: dict[str, str], tmp_path: Path) -> None:
    r = vmctl(env, *up_args(env, tmp_path, "fl0", "--net", "none", "--disk-floor", "lots"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--disk-floor 'lots' is not a size" in r.stderr
    r = vmctl(env, *up_args(env, tmp_path, "fl1", "--net", "none", "--disk-floor", "1000T"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "under the disk floor of" in r.stderr and "--disk-floor" in r.stderr
    assert not (Path(env["VMCTL_HOME"]) / "instances" / "fl1").exists()


def _status(env: dict[str, str], name: str) -> dict[str, object]:
    r = vmctl(env, "status", name, "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    data: dict[str, object] = json.loads(r.stdout)
    return data


def _until(what: str, check: object, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise AssertionError(f"not {what} within {within} s")


def _events(env: dict[str, str], name: str) -> list[dict[str, object]]:
    log = Path(env["VMCTL_HOME"]) / "events" / f"guest-{name}.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def ballast(tmp_path: Path) -> Iterator[Path]:
    """256 MiB of real blocks on the workspace's filesystem, outside the workspace."""
    path = tmp_path / "ballast"
    with path.open("wb") as f:
        for _ in range(256):
            f.write(b"\xa5" * MIB)
        f.flush()
        os.fsync(f.fileno())
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.qemu
@pytest.mark.slow
def test_a_guest_filling_the_disk_is_paused_and_goes_on_once_space_is_back(
    env: dict[str, str], tmp_path: Path, ballast: Path
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    name = "floor"
    # The floor sits 96 MiB under what is free now: the guest crosses it
    # halfway through writing 192 MiB, and deleting the ballast frees 256.
    limit = floor.free_bytes(ws) - 96 * MIB
    r = vmctl(env, *up_args(env, ws, name, "--ephemeral", "--detach", "--net", "none",
                            "--disk-floor", str(limit)))  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        writer = subprocess.Popen(
            [*VMCTL, "exec", name, "--", "sh", "-c",
             "i=0; while [ $i -lt 192 ]; do dd if=/dev/zero bs=1048576 count=1 "
             ">>/workspace/big 2>/dev/null || exit 1; i=$((i+1)); done"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        _until("paused", lambda: _status(env, name)["state"] == "paused", within=120)
        status = _status(env, name)
        assert status["disk_floor"] == {**status["disk_floor"], "paused": True}  # type: ignore[dict-item]
        paused = [e for e in _events(env, name) if e.get("action") == "pause"]
        assert paused and paused[0]["reason"] == "disk_floor" and paused[0]["kind"] == "lifecycle"
        size = (ws / "big").stat().st_size
        assert 90 * MIB < size < 192 * MIB
        time.sleep(1.5)
        assert (ws / "big").stat().st_size == size, "a paused guest went on writing"
        assert writer.poll() is None
        text = vmctl(env, "status", name).stdout
        assert "paused the guest" in text and "vmctl down floor" in text
        waiting = subprocess.Popen(
            [*VMCTL, "exec", name, "--", "true"], env=env, stderr=subprocess.PIPE, text=True
        )  # a command sent now waits for the guest, and says why

        ballast.unlink()  # the user makes room: the guest goes on by itself
        _until("running again", lambda: _status(env, name)["state"] == "running")
        _, said = waiting.communicate(timeout=120)
        assert waiting.returncode == 0 and "floor is paused: its workspace's disk" in said, said
        _, err = writer.communicate(timeout=180)
        assert writer.returncode == 0, err
        assert (ws / "big").stat().st_size == 192 * MIB  # nothing of the agent's work lost
        assert [e["action"] for e in _events(env, name) if e.get("reason") == "disk_floor"] == [
            "pause",
            "resume",
        ]
    finally:
        vmctl(env, "down", name, timeout=90)
    assert not (Path(env["VMCTL_HOME"]) / "instances" / name).exists()


# ---- the same floor for a host client (`vmctl run`) ----

#: 192 MiB in 1 MiB steps, as an agent's build would write them: a few
#: seconds, so the floor (checked twice a second) is crossed halfway.
WRITER = (
    "import time\n"
    "with open('big', 'ab') as f:\n"
    "    for _ in range(192):\n"
    "        f.write(bytes(1 << 20)); f.flush(); time.sleep(0.02)\n"
)


def test_a_stopped_process_tree_is_continued_whole(tmp_path: Path) -> None:
    """The client's switches reach every process below it, forked ones included."""
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        time.sleep(0.3)
        tree = floor.process_tree(parent.pid)
        assert len(tree) == 3 and tree[0] == parent.pid
        pause, resume = floor.process_switches(parent.pid)
        assert pause()
        states = [Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] for p in tree]
        assert states == ["T", "T", "T"]
        assert resume()
        states = [Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] for p in tree]
        assert "T" not in states
    finally:
        for pid in floor.process_tree(parent.pid):
            os.kill(pid, 9)
        parent.wait()


@pytest.mark.slow
def test_a_host_client_filling_the_disk_is_paused_and_goes_on_once_space_is_back(
    bwrap_bin: Path, workspace: Path, ballast: Path, http_stub: StubFactory
) -> None:
    model = http_stub(lambda req: (200, b'{"object": "list", "data": [{"id": "m"}]}'))
    limit = floor.free_bytes(workspace) - 96 * MIB
    argv = [*VMCTL, "run", "shell", "-w", str(workspace), "--endpoint", model.url,
            "--disk-floor", str(limit), "--", os.path.realpath(sys.executable), "-I", "-S",
            "-c", WRITER]  # fmt: skip
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = Path(os.environ["VMCTL_HOME"]) / "events" / "client-shell.jsonl"
        _until("paused", lambda: log.exists() and '"pause"' in log.read_text())
        size = (workspace / "big").stat().st_size
        assert 90 * MIB < size < 192 * MIB
        time.sleep(1.5)
        assert (workspace / "big").stat().st_size == size, "a paused client went on writing"
        assert client.poll() is None
        ballast.unlink()
        _, err = client.communicate(timeout=180)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err
    assert "shell paused:" in err and "Ctrl-C stops it" in err  # the user is told at once
    assert (workspace / "big").stat().st_size == 192 * MIB
    said = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(e["action"], e["reason"], e["who_kind"]) for e in said] == [
        ("pause", "disk_floor", "client"),
        ("resume", "disk_floor", "client"),
    ]
