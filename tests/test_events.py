"""The one event record: round trip, strict parsing, rotation, safe display."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmctl import events
from vmctl.events import Event, EventLog

BASE = '{"kind": "request", "who_kind": "guest", "who": "b", "by": "g", "action": "x"}'


def test_round_trip_and_time_order(tmp_path: Path) -> None:
    a = tmp_path / "guest-box.jsonl"
    b = tmp_path / "server-s.jsonl"
    with EventLog(a) as log:
        log.write(
            Event(
                "request", "guest", "box", "gateway", "POST /v1/x", time="2026-01-01T00:00:02.000Z"
            )
        )
    with EventLog(b) as log:
        log.write(
            Event(
                "lifecycle", "server", "s", "supervisor", "serve", time="2026-01-01T00:00:01.000Z"
            )
        )
        log.write(
            Event("request", "guest", "box", "gateway", "GET /v1/models", status=200, bytes_up=10)
        )
    got = events.read_all([a, b])
    assert [e.action for e in got] == ["serve", "POST /v1/x", "GET /v1/models"]
    assert got[2].status == 200 and got[2].bytes_up == 10 and got[2].time.endswith("Z")
    assert a.stat().st_mode & 0o777 == 0o600
    assert "status" not in json.loads(a.read_text())  # None fields are left out


@pytest.mark.parametrize(
    "line",
    [
        BASE[:-1] + ', "evil": 1}',
        BASE.replace('"request"', '"nope"'),
        BASE[:-1] + ', "status": "200"}',
        "[1, 2]",
    ],
)
def test_parsing_is_strict(line: str) -> None:
    with pytest.raises((ValueError, TypeError)):
        Event.from_json(line)


def test_bad_lines_are_skipped_not_fatal(tmp_path: Path) -> None:
    f = tmp_path / "guest-x.jsonl"
    good = Event("request", "guest", "x", "relay", "GET /").to_json()
    f.write_text("not json\n" + good + "\n" + '{"kind": 1}\n')
    assert [e.action for e in events.read_file(f)] == ["GET /"]


def test_rotation_keeps_one_old_file(tmp_path: Path) -> None:
    f = tmp_path / "client-c.jsonl"
    with EventLog(f, max_bytes=400) as log:
        for i in range(20):
            log.write(Event("request", "client", "c", "bridge", f"GET /{i}"))
    assert f.with_name(f.name + ".1").exists()
    assert f.stat().st_size <= 400
    kept = [e.action for e in events.read_file(f)]
    assert kept[-1] == "GET /19" and len(kept) < 20


def test_safe_escapes_terminal_controls() -> None:
    hostile = "GET /\x1b]2;pwned\x07\x1b[2J\r\nforged\u202e line"
    shown = events.safe(hostile)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in shown)
    assert shown == "GET /\\x1b]2;pwned\\x07\\x1b[2J\\x0d\\x0aforged\\x202e line"


def test_subject_names_cannot_escape(tmp_path: Path) -> None:
    assert events.subject_file(tmp_path, "guest", "box").name == "guest-box.jsonl"
    with pytest.raises(ValueError):
        events.subject_file(tmp_path, "guest", "../x")
