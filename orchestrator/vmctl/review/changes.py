"""What the agent changed in the review copy, and how it is shown.

A change is a path whose entry (type, content hash, permission bits) in
the copy differs from the snapshot. Changes that `apply` will never land
(device nodes, fifos, symlinks leading out of the workspace) carry the
reason in `refused`, so `diff` says so up front. Paths and text come from
the guest: everything printed goes through `events.safe()`.
"""

from __future__ import annotations

import difflib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmctl.errors import ConfigError
from vmctl.events import safe
from vmctl.review.entries import DIR, FILE, LINK, SPECIAL, Entry, read_entry, scan

if TYPE_CHECKING:  # annotations only: snapshot imports this module for drop_if_clean
    from vmctl.review.snapshot import Review

#: Text files above this are summarised, not diffed.
MAX_DIFF_BYTES = 1 << 20
SUID_BITS = stat.S_ISUID | stat.S_ISGID


@dataclass(frozen=True)
class Change:
    path: str
    kind: str  # added | deleted | modified | mode | type
    old: Entry | None
    new: Entry | None
    refused: str | None = None

    def to_json(self) -> dict[str, Any]:
        def side(e: Entry | None) -> dict[str, Any] | None:
            if e is None:
                return None
            return {"type": e.special or e.kind, "mode": f"{e.mode:04o}", "size": e.size}

        out: dict[str, Any] = {"path": self.path, "change": self.kind}
        out |= {"old": side(self.old), "new": side(self.new), "refused": self.refused}
        if self.new is not None and self.new.kind == LINK:
            out["target"] = self.new.key
        return out


def link_escapes(rel: str, target: str) -> bool:
    """True if a symlink at `rel` pointing at `target` resolves outside the workspace."""
    if not target or os.path.isabs(target) or "\0" in target:
        return True
    joined = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    return joined == ".." or joined.startswith("../")


def runs_on_host(rel: str) -> bool:
    """A path git on the host executes from: `.git/config` (core.fsmonitor, aliases,
    filters), `.git/hooks/*`, or a `.git` file pointing git elsewhere (any repo depth)."""
    parts = rel.split("/")
    for i, part in enumerate(parts):
        if part == ".git":
            rest = parts[i + 1 :]
            return not rest or rest == ["config"] or rest[0] == "hooks"
    return False


def refusal(rel: str, new: Entry | None) -> str | None:
    """Why `apply` would never land this entry, or None."""
    if new is None:
        return None
    if runs_on_host(rel) and new.kind != DIR:
        return "git on the host runs what this names: never applied (read it, copy by hand)"
    if new.kind == SPECIAL:
        return f"{new.special}: never applied"
    if new.kind == LINK and link_escapes(rel, new.key):
        return f"symlink to {safe(new.key)!r} points outside the workspace: never applied"
    return None


def _kind(old: Entry | None, new: Entry | None) -> str | None:
    if old is None and new is None:
        return None
    if old is None:
        return "added"
    if new is None:
        return "deleted"
    if old.kind != new.kind:
        return "type"
    if old.key != new.key:
        return "modified"
    if old.mode != new.mode and old.kind != LINK:
        return "mode"
    return None


def normalize(review: Review, path: str) -> str:
    """A user's PATH argument as a path relative to the workspace."""
    p = path
    for root in (str(review.source), "/workspace"):
        if p == root or p.startswith(root.rstrip("/") + "/"):
            p = p[len(root) :]
            break
    else:
        if p.startswith("/"):  # /etc/passwd is not the workspace's etc/passwd
            raise ConfigError(f"path {path!r} is outside the workspace", "give paths inside it")
    p = os.path.normpath(p.strip("/")) if p.strip("/") else "."
    if p == ".." or p.startswith("../"):
        raise ConfigError(f"path {path!r} is outside the workspace", "give paths inside it")
    return "" if p == "." else p


def selected(rel: str, wanted: list[str]) -> bool:
    return not wanted or any(w == "" or rel == w or rel.startswith(w + "/") for w in wanted)


def changes(review: Review, wanted: list[str] | None = None) -> list[Change]:
    """Every change under the `wanted` paths (all when empty), sorted by path."""
    sel = [normalize(review, w) for w in wanted or []]
    now = scan(review.paths.work, review.manifest)
    for w, given in zip(sel, wanted or [], strict=True):  # a typo is named, not "nothing"
        if w and not any(selected(rel, [w]) for rel in (*review.manifest, *now)):
            raise ConfigError(
                f"{given!r} is in neither the review copy nor its snapshot",
                f"see `vmctl diff {review.name} --stat`",
            )
    out = []
    for rel in sorted(set(review.manifest) | set(now)):
        if not selected(rel, sel):
            continue
        old, new = review.manifest.get(rel), now.get(rel)
        kind = _kind(old, new)
        if kind is None:
            continue
        out.append(Change(rel, kind, old, new, refusal(rel, new)))
    return out


def _read_text(path: Path) -> list[str] | None:
    """A file's lines, or None if it is binary, too large or missing."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_DIFF_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def unified(review: Review, change: Change) -> str:
    """The diff of one change: unified for text, a summary line otherwise."""
    rel, old, new = change.path, change.old, change.new
    head = f"--- {change.kind}: {safe(rel)}"
    notes = []
    if old and new and old.mode != new.mode:
        notes.append(f"mode {old.mode:04o} -> {new.mode:04o}")
    if new and new.mode & SUID_BITS and new.kind == FILE:
        notes.append("setuid/setgid bit: dropped on apply")
    if new and new.kind == LINK:
        notes.append(f"symlink -> {safe(new.key)}")
    if change.refused:
        notes.append(f"REFUSED: {change.refused}")
    lines = [head + (f" ({'; '.join(notes)})" if notes else "")]
    old_file = old is not None and old.kind == FILE
    new_file = new is not None and new.kind == FILE
    if not (old_file or new_file) or change.kind == "mode":
        return "\n".join(lines)
    before: list[str] | None = []
    base_kept = True
    if old_file:
        user = read_entry(review.source / rel)
        base_kept = user is not None and user.same_content(old)
        before = _read_text(review.source / rel) if base_kept else None
        if not base_kept:
            lines.append("  (the user's file changed since the snapshot: apply will refuse it)")
    after = _read_text(review.paths.work / rel) if new_file else []
    if not base_kept and after is not None:  # the snapshot keeps hashes, not the old text
        lines.append("  no text diff: the snapshot's text is gone from your folder")
        return "\n".join(lines)
    if before is None or after is None:
        size = new.size if new else 0
        lines.append(f"  binary or large file ({size} bytes), not shown")
        return "\n".join(lines)
    a = f"a/{rel}" if old_file else "/dev/null"
    b = f"b/{rel}" if new_file else "/dev/null"
    body = "".join(difflib.unified_diff(before, after, a, b))
    lines.append(safe_lines(body))
    return "\n".join(line for line in lines if line)


def safe_lines(text: str) -> str:
    """Escape control characters but keep the diff's own newlines and tabs."""
    return "\n".join(safe(line).replace("\\x09", "\t") for line in text.splitlines())


def stat_line(change: Change) -> str:
    letter = {"added": "A", "deleted": "D", "modified": "M", "mode": "m", "type": "T"}
    extra = ""
    if change.old and change.new and change.old.mode != change.new.mode:
        extra = f" {change.old.mode:04o} -> {change.new.mode:04o}"
    if change.new and change.new.kind == LINK:
        extra += f" -> {safe(change.new.key)}"
    if change.refused:
        extra += f"  [refused: {change.refused}]"
    return f"{letter[change.kind]} {safe(change.path)}{extra}"
