"""`vmctl apply`: land the agent's changes where the user's files still match.

For each change the user's current file is compared with the snapshot
(type and SHA-256): if the user changed it meanwhile, the change is a
conflict, listed and left alone. What lands is written to a temporary
file beside the target and renamed over it, re-hashed on the way so a
file the guest is still writing is not landed half-done. Never landed:
device nodes, fifos, sockets, symlinks that lead out of the workspace, and
setuid/setgid/sticky bits (the file lands without them). Nothing is
written through a symlinked parent folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vmctl import events, paths
from vmctl.events import safe
from vmctl.review.changes import Change, changes
from vmctl.review.entries import DIR, FILE, LINK, Entry, read_entry
from vmctl.review.snapshot import Review


class Conflict(Exception):
    """This change cannot land now; the message says why."""


@dataclass
class Outcome:
    applied: list[str] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "applied": self.applied,
            "conflicts": [{"path": p, "reason": r} for p, r in self.conflicts],
            "refused": [{"path": p, "reason": r} for p, r in self.refused],
            "notes": self.notes,
        }


def _check_parents(root: Path, rel: str) -> None:
    """Refuse to write below a parent that is a symlink or not a folder."""
    cur = root
    for part in Path(rel).parts[:-1]:
        cur = cur / part
        try:
            st = cur.lstat()
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise Conflict(f"parent {safe(os.path.relpath(cur, root))} is not a plain folder")


def _make_parents(review: Review, rel: str) -> None:
    cur = ""
    for part in Path(rel).parts[:-1]:
        cur = f"{cur}/{part}" if cur else part
        target = review.source / cur
        if not target.exists():
            work = read_entry(review.paths.work / cur)
            target.mkdir(mode=(work.mode if work else 0o755) & 0o777)
            if work is not None:
                review.manifest[cur] = work


def _copy_file(src: Path, dst: Path, want: Entry) -> None:
    """Copy `src` over `dst` atomically; Conflict if its content is not `want`'s."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".vmctl-apply.")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, src.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != want.key:
            raise Conflict("the guest changed it again while it was copied; apply again")
        os.chmod(tmp, want.mode & 0o777)
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _check_user(change: Change, user: Entry | None) -> None:
    old, new = change.old, change.new
    if old is None:
        if user is not None and not (new is not None and user.same_content(new)):
            raise Conflict("the user created a different one since the snapshot")
        return
    if user is None:
        if new is None:
            return
        raise Conflict("the user deleted it since the snapshot")
    if old.kind == DIR and user.kind == DIR:
        return
    if not user.same_content(old):
        raise Conflict("the user changed it since the snapshot")
    if change.kind == "mode" and user.mode != old.mode:
        raise Conflict(f"the user changed its mode to {user.mode:04o} since the snapshot")


def _remove(target: Path, user: Entry | None) -> None:
    if user is None:
        return
    if user.kind == DIR:
        try:
            target.rmdir()
        except OSError:
            raise Conflict("the folder is not empty on the user's side") from None
    else:
        target.unlink()


def _land(review: Review, change: Change, out: Outcome) -> None:
    rel, new = change.path, change.new
    target = review.source / rel
    _check_parents(review.source, rel)
    user = read_entry(target)
    _check_user(change, user)
    if new is None:
        _remove(target, user)
        review.manifest.pop(rel, None)
        return
    _make_parents(review, rel)
    if new.kind == DIR:
        if user is not None and user.kind != DIR:
            _remove(target, user)
        if user is None or user.kind != DIR:
            target.mkdir(mode=new.mode & 0o777)
        os.chmod(target, new.mode & 0o777)
    elif new.kind == FILE:
        if user is not None and user.kind == DIR:
            _remove(target, user)
        _copy_file(review.paths.work / rel, target, new)
    elif new.kind == LINK:
        if user is not None:
            _remove(target, user)
        os.symlink(new.key, target)
    if new.mode & ~0o777 and new.kind != LINK:
        out.notes.append(f"{safe(rel)}: mode {new.mode:04o} landed as {new.mode & 0o777:04o}")
    review.manifest[rel] = new


def apply(review: Review, wanted: list[str] | None = None) -> Outcome:
    """Land every change under `wanted` (all when empty) that is safe and unconflicted."""
    todo = changes(review, wanted)
    ordered = [c for c in todo if c.new is not None]
    ordered += sorted((c for c in todo if c.new is None), key=lambda c: c.path, reverse=True)
    out = Outcome()
    try:
        for change in ordered:
            if change.refused:
                out.refused.append((change.path, change.refused))
                continue
            try:
                _land(review, change, out)
            except Conflict as e:
                out.conflicts.append((change.path, str(e)))
                continue
            except OSError as e:
                out.conflicts.append((change.path, f"cannot write: {e.strerror}"))
                continue
            out.applied.append(change.path)
    finally:
        review.save_manifest()
        record(review.name, out)
    return out


def record(name: str, out: Outcome) -> None:
    """One lifecycle event per `apply`: what landed in the user's folder, what did not."""
    detail = json.dumps({k: v for k, v in out.to_json().items() if v}, sort_keys=True)
    decision = "deny" if out.conflicts or out.refused else "allow"
    events.lifecycle(
        paths.events_dir(), "guest", name, "vmctl", "apply", decision=decision, detail=detail[:4000]
    )
