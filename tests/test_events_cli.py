"""`vmctl events` and `vmctl logs` over the event files: merged, filtered, escaped, removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vmctl import events
from vmctl.events import Event, EventLog

HOSTILE = "/\x1b]2;pwned\x07\x1b[2J\r\nforged line"


def vmctl(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmctl", *args],
        env={**os.environ, "VMCTL_HOME": str(home), **env},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def seed(home: Path) -> None:
    folder = home / "events"
    with EventLog(events.subject_file(folder, "guest", "box")) as log:
        log.write(
            Event("connection", "guest", "box", "sidecar", "close", time="2026-01-01T00:00:03.000Z")
        )
        log.write(
            Event(
                "request", "guest", "box", "gateway", f"GET {HOSTILE}", path=HOSTILE, status=400,
                server="s1", time="2026-01-01T00:00:01.000Z",
            )
        )  # fmt: skip
    with EventLog(events.subject_file(folder, "server", "s1")) as log:
        log.write(
            Event(
                "lifecycle",
                "server",
                "s1",
                "supervisor",
                "ready",
                server="s1",
                time="2026-01-01T00:00:00.000Z",
            )
        )
    with EventLog(events.subject_file(folder, "host", "local")) as log:
        log.write(
            Event(
                "request",
                "host",
                "local",
                "gateway",
                "GET /v1/models",
                server="s1",
                time="2026-01-01T00:00:02.000Z",
            )
        )


def test_events_merge_in_time_order_and_escape(tmp_path: Path) -> None:
    seed(tmp_path)
    out = vmctl(tmp_path, "events", VMCTL_EVENTS_KEEP_DAYS="0")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[1] for line in lines] == [
        "server:s1",
        "guest:box",
        "host:local",
        "guest:box",
    ]
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout and "\r" not in out.stdout
    assert "\\x1b]2;pwned\\x07" in out.stdout and len(lines) == 4  # no forged line
    js = vmctl(tmp_path, "events", "--json", "--who", "box", VMCTL_EVENTS_KEEP_DAYS="0")
    assert [json.loads(x)["who"] for x in js.stdout.splitlines()] == ["box", "box"]
    assert "\x1b" not in js.stdout  # JSON escapes it too
    later = vmctl(
        tmp_path, "events", "--since", "2026-01-01T00:00:01.500Z", VMCTL_EVENTS_KEEP_DAYS="0"
    )
    assert len(later.stdout.splitlines()) == 2


def test_logs_of_a_server_include_its_callers_requests_and_rm_removes_a_guests(
    tmp_path: Path,
) -> None:
    seed(tmp_path)
    s1 = vmctl(tmp_path, "logs", "s1", VMCTL_EVENTS_KEEP_DAYS="0")
    assert [line.split()[1] for line in s1.stdout.splitlines()] == [
        "server:s1",
        "guest:box",
        "host:local",
    ]
    box = vmctl(tmp_path, "logs", "box", VMCTL_EVENTS_KEEP_DAYS="0")
    assert len(box.stdout.splitlines()) == 2 and "\x1b" not in box.stdout
    # The guest is gone (no folder), its lines stay until `vmctl rm`.
    assert vmctl(tmp_path, "rm", "box").returncode == 0
    assert vmctl(tmp_path, "logs", "box", VMCTL_EVENTS_KEEP_DAYS="0").returncode == 1
    # The retention removes files silent for longer than it.
    assert len(vmctl(tmp_path, "events").stdout.splitlines()) == 2  # recent files: kept
    for f in (tmp_path / "events").iterdir():
        os.utime(f, (0, 0))
    vmctl(tmp_path, "events", VMCTL_EVENTS_KEEP_DAYS="1")
    assert list((tmp_path / "events").iterdir()) == []


def test_events_follow_prints_new_lines_escaped(tmp_path: Path) -> None:
    seed(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmctl", "events", "-f", "--who", "box"],
        env={**os.environ, "VMCTL_HOME": str(tmp_path), "VMCTL_EVENTS_KEEP_DAYS": "0"},
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        old = [proc.stdout.readline() for _ in range(2)]
        assert all("guest:box" in line for line in old)
        with EventLog(events.subject_file(tmp_path / "events", "guest", "box")) as log:
            log.write(Event("request", "guest", "box", "gateway", "GET /new\x1b[2J", status=200))
        new = proc.stdout.readline()
        assert "GET /new\\x1b[2J 200" in new
    finally:
        proc.kill()
        proc.wait()
