"""The port mirror's parts without a guest: the watcher script on the host's
own /proc, the sidecar's decisions against a fake monitor, and the argv."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vmctl import events
from vmctl.images.micro import guest_file
from vmctl.paths import InstancePaths
from vmctl.sidecars import mirror
from vmctl.vm.qemu import InstanceSpec, mirror_argv


def watch(shell: list[str], tmp_path: Path) -> list[str]:
    """Run the guest's watcher for a moment with a plain file as its port."""
    script = tmp_path / "watch.sh"
    script.write_text(guest_file("vmctl-ports-watch.sh"))
    out = tmp_path / "port"
    out.touch()
    proc = subprocess.Popen([*shell, str(script), str(out), "0.05", "3", "64"])
    deadline = time.monotonic() + 10  # a loaded host: wait for two reports, not a fixed time
    while time.monotonic() < deadline and len(out.read_text().splitlines()) < 2:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    return out.read_text().splitlines()


@pytest.mark.parametrize("shell", [["bash"], ["busybox", "sh"]])
def test_watcher_reports_wildcard_listeners_not_loopback(shell: list[str], tmp_path: Path) -> None:
    if not shutil.which(shell[0]):
        pytest.skip(f"{shell[0]} not installed")
    with socket.socket() as anyaddr, socket.socket() as lo:
        anyaddr.bind(("0.0.0.0", 0))
        anyaddr.listen()
        lo.bind(("127.0.0.1", 0))
        lo.listen()
        lines = watch(shell, tmp_path)
        ports = {int(p) for p in lines[-1].split()[1:]}
        assert anyaddr.getsockname()[1] in ports
        assert lo.getsockname()[1] not in ports
        assert len(lines) >= 2, "the heartbeat repeats the report"
        assert all(line.startswith("ports") for line in lines)


class FakeMonitor:
    """QEMU's monitor as the mirror sees it: hostfwd_* lines in, text out."""

    def __init__(self, busy: set[int]):
        self.busy = busy
        self.lines: list[str] = []

    def hmp(self, line: str) -> str:
        self.lines.append(line)
        port = int(line.rsplit(":", 1)[1].split("-")[0])
        if line.startswith("hostfwd_add") and port in self.busy:
            return f"Could not set up host forwarding rule 'tcp:127.0.0.1:{port}-:{port}'\r\n"
        return ""


def test_sidecar_adds_removes_and_skips(tmp_path: Path) -> None:
    root = tmp_path / "instances" / "a"
    root.mkdir(parents=True)
    log_path = tmp_path / "events" / "guest-a.jsonl"
    with socket.socket() as taken, events.EventLog(log_path) as log:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        m = mirror.Mirror(InstancePaths(root), "a", log, static={9000})
        m.mon = FakeMonitor(busy={busy})  # type: ignore[assignment]
        m.apply(mirror.parse_report(f"ports 8080 {busy} 9000".encode(), 64) or set())
        assert sorted(m.live) == [8080]
        m.apply({busy, 9000})
        m.apply(set())
    assert m.mon.lines == [  # type: ignore[union-attr]
        "hostfwd_add n0 tcp:127.0.0.1:8080-:8080",
        f"hostfwd_add n0 tcp:127.0.0.1:{busy}-:{busy}",
        "hostfwd_remove n0 tcp:127.0.0.1:8080",
    ]
    got = [(e.action, e.port, e.reason or "") for e in events.read_file(log_path)]
    assert got[0][:2] == ("add", 8080) and got[-1][:2] == ("remove", 8080)
    skips = {p: why for a, p, why in got if a == "skip"}
    assert sorted(skips) == sorted([busy, 9000]) and len(got) == 4
    assert "in use on the host" in skips[busy] and "-p forward" in skips[9000]


def test_report_parsing_is_bounded() -> None:
    assert mirror.parse_report(b"ports", 64) == set()
    assert mirror.parse_report(b"hello 80", 64) is None
    assert mirror.parse_report(b"ports 0 70000 x 22 80", 64) == {22, 80}
    assert mirror.parse_report(b"ports " + b" ".join(b"%d" % p for p in range(1, 200)), 64) == set(
        range(1, 65)
    )


def test_mirror_argv_only_with_a_network(tmp_path: Path) -> None:
    ip = InstancePaths(tmp_path)
    ws = tmp_path
    assert mirror_argv(InstanceSpec("a", ws, net="none", mirror=True), ip) == []
    assert mirror_argv(InstanceSpec("a", ws, net="full", mirror=False), ip) == []
    argv = mirror_argv(InstanceSpec("a", ws, net="full", mirror=True), ip)
    assert "virtserialport,chardev=ports,name=org.vmctl.ports" in argv
    assert "chardev=mqmp,mode=control" in argv


def test_status_says_why_nothing_is_mirrored(tmp_path: Path) -> None:
    ip = InstancePaths(tmp_path)
    off = mirror.describe({"net": "none", "mirror": True}, ip, True)
    assert off["state"] == "off" and "--net none" in off["why"]
    assert "--no-mirror" in mirror.describe({"net": "model", "mirror": False}, ip, True)["why"]


def test_skipped_port_is_retried_once_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "instances" / "a"
    root.mkdir(parents=True)
    monkeypatch.setattr(mirror, "RETRY_S", 0.0)
    with events.EventLog(tmp_path / "ev.jsonl") as log:
        m = mirror.Mirror(InstancePaths(root), "a", log, static=set())
        mon = FakeMonitor(busy={8081})
        m.mon = mon  # type: ignore[assignment]
        m.apply({8081})
        m.apply({8081})  # still busy: tried again, logged once
        mon.busy.clear()
        m.apply({8081})
    assert sorted(m.live) == [8081]
    acts = [e.action for e in events.read_file(tmp_path / "ev.jsonl")]
    assert acts == ["skip", "add"]
    assert mirror.describe({"net": "model", "mirror": True}, InstancePaths(root), True)["live"] == [
        8081
    ]
