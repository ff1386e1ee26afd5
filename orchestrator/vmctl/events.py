"""One record for everything vmctl audits, and one way to write and read it.

Requests through the gateway, connections on a guest's model path, egress
attempts, port forwards and lifecycle steps (serve, up, down, crash, reap,
restart) are all `Event`s: JSON lines with ISO 8601 UTC times, appended to
one file per subject under `paths.events_dir()` (`guest-box.jsonl`,
`server-serve-8080.jsonl`, `client-opencode.jsonl`). A subject's file
outlives the subject (an ephemeral guest's lines stay after `down`) until
`vmctl rm` or the retention removes it. `vmctl events` merges them all in
time order; `vmctl logs NAME` reads one subject.

Byte counts have one meaning everywhere: `bytes_up` went from the caller
(`who`) towards its destination, `bytes_down` came back to the caller.

Text in a record may come from a guest or the network; `safe()` escapes
control characters before anything is shown on a terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: What an event is about.
KINDS = ("request", "connection", "egress", "forward", "lifecycle")
#: Who can appear as `who_kind`.
WHO_KINDS = ("guest", "client", "server", "host")
#: A subject's file is rotated once (to `.1`) past this size.
MAX_LOG_BYTES = 32 << 20
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SUBJECT_RE = re.compile(r"^(guest|client|server|host)-[a-z0-9][a-z0-9._-]{0,39}$")


def now() -> str:
    """The current time as ISO 8601 UTC with milliseconds (`...Z`)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Event:
    """One audited thing. Only `kind`, `who_kind`, `who`, `by` and `action` are required."""

    kind: str
    who_kind: str
    who: str
    by: str
    action: str
    time: str = ""
    method: str | None = None
    path: str | None = None
    status: int | None = None
    host: str | None = None
    port: int | None = None
    #: An IP address: egress, the destination's; a host request, the caller's (its peer).
    address: str | None = None
    decision: str | None = None
    rule: str | None = None
    reason: str | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None
    duration_ms: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    model: str | None = None
    detail: str | None = None
    #: The server whose gateway answered a request (`vmctl logs SERVER` shows them).
    server: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"event kind {self.kind!r} is not one of {KINDS}")
        if self.who_kind not in WHO_KINDS:
            raise ValueError(f"who_kind {self.who_kind!r} is not one of {WHO_KINDS}")
        if self.decision not in (None, "allow", "deny"):
            raise ValueError(f"decision {self.decision!r} is not allow or deny")
        if not self.time:
            object.__setattr__(self, "time", now())

    def to_json(self) -> str:
        """One line, None fields left out, keys sorted (stable for tests and diffs)."""
        # Not asdict(): it deep-copies every field, a real cost on every request.
        data = {k: v for k in _FIELD_NAMES if (v := getattr(self, k)) is not None}
        return json.dumps(data, sort_keys=True, ensure_ascii=True)

    @classmethod
    def from_json(cls, line: str) -> Event:
        """Parse one line strictly: unknown keys and wrong types are errors."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError("an event is a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise ValueError(f"unknown event fields: {sorted(unknown)}")
        for key, value in data.items():
            if value is None:
                continue
            want = str(known[key].type)
            ok = (
                (want.startswith("str") and isinstance(value, str))
                or (
                    want.startswith("int")
                    and isinstance(value, int)
                    and not isinstance(value, bool)
                )
                or (want.startswith("float") and isinstance(value, int | float))
            )
            if not ok:
                raise ValueError(f"event field {key} has the wrong type")
        return cls(**data)

    @property
    def subject(self) -> str:
        """`guest-box`: the name of the file this event belongs in by its caller."""
        return f"{self.who_kind}-{self.who}"


_FIELD_NAMES = tuple(f.name for f in fields(Event))


def safe(text: object) -> str:
    """`text` with every control character (C0, C1, DEL, bidi overrides) as `\\xNN`.

    A guest controls request lines, paths and host names; printed raw, an
    escape sequence could retitle or clear the user's terminal or forge a line.
    """
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


class EventLog:
    """Appends events to one subject's file (0600, O_APPEND, one write per line).

    Several processes may append to the same file: each line is written
    with a single `write()` on an O_APPEND descriptor, so lines never
    interleave. Past `max_bytes` the file is rotated once to `NAME.1`.
    """

    def __init__(self, path: Path, max_bytes: int = MAX_LOG_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def write(self, event: Event) -> None:
        line = (event.to_json() + "\n").encode()
        fd = self._open()
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_size + len(line) > self.max_bytes:
                self.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                fd = self._open()
        os.write(fd, line)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lifecycle(
    events_dir: Path, who_kind: str, who: str, by: str, action: str, **fields: Any
) -> None:
    """One lifecycle step (serve, up, down, crash, reap, ...) in the subject's file.

    Best effort: an audit line that cannot be written (a full disk, a name
    the file system refuses) never fails the step it describes.
    """
    with (
        contextlib.suppress(OSError, ValueError),
        EventLog(subject_file(events_dir, who_kind, who)) as log,
    ):
        log.write(Event("lifecycle", who_kind, who, by, action, **fields))


def subject_file(events_dir: Path, who_kind: str, name: str) -> Path:
    """The file of one subject; refuses names that could leave `events_dir`."""
    subject = f"{who_kind}-{name}"
    if not _SUBJECT_RE.match(subject):
        raise ValueError(f"invalid event subject {subject!r}")
    return events_dir / f"{subject}.jsonl"


def read_file(path: Path) -> Iterator[Event]:
    """The events of one file (its rotated `.1` first); bad lines are skipped."""
    for p in (path.with_name(path.name + ".1"), path):
        try:
            f = p.open(encoding="utf-8", errors="replace")
        except OSError:
            continue
        with f:
            for line in f:
                with contextlib.suppress(ValueError, TypeError):
                    yield Event.from_json(line)


def read_all(files: Iterable[Path]) -> list[Event]:
    """Every event of `files`, in time order (ISO times sort as strings)."""
    out = [e for f in files for e in read_file(f)]
    out.sort(key=lambda e: e.time)
    return out


def follow(files_fn: Any, interval: float = 0.25) -> Iterator[Event]:
    """New events as they are appended to the files `files_fn()` returns (for `-f`)."""
    offsets: dict[Path, int] = {f: f.stat().st_size for f in files_fn() if f.exists()}
    while True:
        batch: list[Event] = []
        for f in files_fn():
            try:
                size = f.stat().st_size
            except OSError:
                continue
            start = offsets.get(f, 0)
            if size < start:  # rotated
                start = 0
            if size > start:
                with f.open("rb") as fh:
                    fh.seek(start)
                    data = fh.read(size - start)
                end = data.rfind(b"\n") + 1
                offsets[f] = start + end
                for line in data[:end].decode("utf-8", "replace").splitlines():
                    with contextlib.suppress(ValueError, TypeError):
                        batch.append(Event.from_json(line))
        batch.sort(key=lambda e: e.time)
        yield from batch
        time.sleep(interval)


# ---- reading for people: which files, which events, one safe line each ----


def all_files(events_dir: Path) -> list[Path]:
    """Every subject's file (their rotated `.1` files are read along with them)."""
    return sorted(events_dir.glob("*.jsonl"))


def name_files(events_dir: Path, name: str) -> list[Path]:
    """The files of every subject called `name` (a guest, a server, a client)."""
    return [f for f in all_files(events_dir) if f.stem.split("-", 1)[-1] == name]


def about(event: Event, name: str) -> bool:
    """True when `name` made the event, or is the server that answered it."""
    return event.who == name or event.server == name


def parse_since(text: str) -> str:
    """`--since`: an ISO time (`2026-01-01T10:00`) or an age (`90s`, `10m`, `2h`, `7d`)."""
    m = re.fullmatch(r"(\d{1,9})([smhd])", text.strip())
    if m:
        seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        then = datetime.now(UTC).timestamp() - seconds
        return datetime.fromtimestamp(then, UTC).isoformat(timespec="milliseconds")[:23] + "Z"
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r} is neither an ISO time nor an age like 10m") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render(e: Event) -> str:
    """One line for a terminal; everything that came from outside is escaped."""
    who = f"{e.who_kind}:{e.who}"
    if e.kind == "request" and e.address:  # the peer of a host request (egress: the target's)
        who += f"@{e.address}"
    parts = [e.time, who, e.action]
    if e.status is not None:
        parts.append(str(e.status))
    if e.decision == "deny" or e.reason:
        parts.append(f"{e.decision or ''}({e.reason or ''})".replace("()", ""))
    if e.bytes_up is not None or e.bytes_down is not None:
        parts.append(f"up={e.bytes_up or 0} down={e.bytes_down or 0}")
    if e.duration_ms is not None:
        parts.append(f"{e.duration_ms}ms")
    if e.tokens_in is not None or e.tokens_out is not None:
        parts.append(f"tokens={e.tokens_in or 0}+{e.tokens_out or 0}")
    if e.server and e.kind == "request":
        parts.append(f"via {e.server}")
    if e.detail:
        parts.append(f"- {e.detail}")
    return safe(" ".join(parts))


def remove_subject(events_dir: Path, name: str) -> list[Path]:
    """`vmctl rm`: a subject's lines go with it."""
    gone = []
    for f in name_files(events_dir, name):
        for p in (f, f.with_name(f.name + ".1")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                gone.append(p)
    return gone


def prune(events_dir: Path, keep_days: float) -> list[Path]:
    """Remove the files of subjects silent for more than `keep_days` (the retention)."""
    cutoff = time.time() - keep_days * 86400
    gone = []
    for f in list(events_dir.glob("*.jsonl")) + list(events_dir.glob("*.jsonl.1")):
        with contextlib.suppress(OSError):
            if f.stat().st_mtime < cutoff:
                f.unlink()
                gone.append(f)
    return gone
