"""`vmctl policy log`: the egress events, aggregated destination by destination.

The raw records stay in the event log (one `Event` of kind `egress` per
attempt, see vmctl.events); this view folds them into one row per caller,
host, port and decision, with counts, bytes and first and last seen, as
Docker's `sbx policy log` shows them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from vmctl import events, paths


@dataclass
class Row:
    who: str  # `guest-box`, `client-shell`
    host: str
    port: int
    decision: str
    count: int
    first: str
    last: str
    rule: str  # the rule that decided the latest attempt
    bytes_up: int
    bytes_down: int

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def egress_events(
    who: str | None = None, files: Iterable[Path] | None = None
) -> list[events.Event]:
    """Every egress event, oldest first; only `who`'s (guest or client name) if given."""
    if files is None:
        files = sorted(p for p in paths.events_dir().glob("*.jsonl"))
    out = [e for e in events.read_all(files) if e.kind == "egress"]
    return [e for e in out if who is None or e.who == who]


def aggregate(evs: Iterable[events.Event]) -> list[Row]:
    """One row per (caller, host, port, decision), most recent first."""
    rows: dict[tuple[str, str, int, str], Row] = {}
    for e in evs:
        host, port, decision = e.host or "?", e.port or 0, e.decision or "?"
        key = (e.subject, host, port, decision)
        row = rows.get(key)
        if row is None:
            row = rows[key] = Row(e.subject, host, port, decision, 0, e.time, e.time, "", 0, 0)
        row.count += 1
        row.first, row.last = min(row.first, e.time), max(row.last, e.time)
        row.rule = e.rule or ""
        row.bytes_up += e.bytes_up or 0
        row.bytes_down += e.bytes_down or 0
    return sorted(rows.values(), key=lambda r: r.last, reverse=True)
