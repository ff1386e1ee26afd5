"""The review copy: taken at boot, kept until applied or removed.

The copy is made by `cp` (copy-on-write clones where the filesystem can:
`--reflink=auto` on Linux, `-c` on macOS; a plain copy otherwise), then
scanned once into the manifest: every path's type, mode and SHA-256 as the
guest first sees it. That manifest is the snapshot: `diff` compares the
copy with it, and `apply` lands a change only where the user's file still
hashes as the manifest says. No second copy of the base is kept; a diff
of a file shows it against the user's file while that still matches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmctl import paths
from vmctl.errors import NotFoundError, VMError
from vmctl.review.entries import FILE, Entry, scan
from vmctl.state import StateError, read_json, write_json

MAX_MANIFEST_BYTES = 512 << 20


@dataclass
class Review:
    """One review copy: its files, the user's folder it came from, and the snapshot."""

    name: str
    paths: paths.ReviewPaths
    source: Path
    manifest: dict[str, Entry]
    meta: dict[str, Any]

    def save_manifest(self) -> None:
        data = {rel: e.to_json() for rel, e in sorted(self.manifest.items())}
        fd, tmp = tempfile.mkstemp(dir=self.paths.root, prefix=".manifest.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, self.paths.manifest)


@dataclass(frozen=True)
class Cost:
    """What taking the snapshot cost (shown at `up`, measured by bench/boot.py)."""

    method: str
    files: int
    bytes: int
    seconds: float

    def describe(self) -> str:
        mb = self.bytes / 1e6
        return f"{self.files} files, {mb:.1f} MB, {self.method} in {self.seconds:.2f} s"


def reflink_works(folder: Path) -> bool:
    """Whether `cp` can clone files in `folder` (probed with two tiny files)."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".probe.") as tmp:
        src = Path(tmp, "a")
        src.write_bytes(b"probe")
        flag = ["-c"] if sys.platform == "darwin" else ["--reflink=always"]
        r = subprocess.run(["cp", *flag, str(src), str(Path(tmp, "b"))], capture_output=True)
        return r.returncode == 0


def copy_tree(src: Path, dst: Path, reflink: bool) -> None:
    """`cp` the contents of `src` into the new folder `dst`, keeping modes, links and times."""
    if sys.platform == "darwin":
        argv = ["cp", "-pPR", *(["-c"] if reflink else []), f"{src}/.", str(dst)]
    else:
        argv = ["cp", "-a", "--reflink=auto", "--", f"{src}/.", str(dst)]
    dst.mkdir(mode=0o700)
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise VMError(
            f"cannot copy {src} for review: {r.stderr.strip()[:300]}",
            "check free space and permissions, or run without --review",
        )


def exists(name: str) -> bool:
    return paths.review(name).meta.is_file()


def load(name: str) -> Review:
    rp = paths.review(name)
    try:
        meta = read_json(rp.meta, {"name": str, "source": str})
    except StateError:
        raise NotFoundError(
            f"no review copy for {name!r}", "start a guest with `vmctl up --review`"
        ) from None
    try:
        if rp.manifest.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError("manifest too large")
        raw = json.loads(rp.manifest.read_text())
        manifest = {str(k): Entry.from_json(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError) as e:
        raise VMError(f"review manifest of {name!r} is unreadable: {e}", f"vmctl rm {name}") from e
    return Review(name, rp, Path(meta["source"]), manifest, meta)


def create(name: str, workspace: Path) -> tuple[Review, Cost]:
    """Copy `workspace` into a new review folder and record its snapshot."""
    rp = paths.review(name)
    if rp.root.exists():
        drop_if_clean(name)
    paths.private_dir(rp.root)
    try:
        start = time.monotonic()
        reflink = reflink_works(rp.root)
        copy_tree(workspace, rp.work, reflink)
        manifest = scan(rp.work)
        seconds = time.monotonic() - start
        files = [e for e in manifest.values() if e.kind == FILE]
        method = "reflink copy" if reflink else "plain copy (no reflink on this filesystem)"
        cost = Cost(method, len(files), sum(e.size for e in files), seconds)
        meta = {
            "name": name,
            "source": str(workspace),
            "created": time.time(),
            "method": method,
            "files": cost.files,
            "bytes": cost.bytes,
            "seconds": round(seconds, 3),
        }
        review = Review(name, rp, workspace, manifest, meta)
        review.save_manifest()
        write_json(rp.meta, meta)
    except BaseException:
        shutil.rmtree(rp.root, ignore_errors=True)
        raise
    return review, cost


def drop(name: str) -> bool:
    """Remove a review copy (applied or discarded); True if there was one."""
    rp = paths.review(name)
    if not rp.root.exists():
        return False
    shutil.rmtree(rp.root, ignore_errors=True)  # another vmctl may be settling it too
    return True


def discard(name: str, pending: int) -> None:
    """Drop a review copy on purpose (`down --discard`), audited."""
    from vmctl import events

    drop(name)
    detail = f"{pending} unapplied change(s) of the review copy dropped"
    events.lifecycle(paths.events_dir(), "guest", name, "vmctl", "discard", detail=detail)


def settle(name: str, drop_changes: bool) -> str | None:
    """After a review guest stops (`down`, `stop`): keep or drop its copy; the line to say.

    Unapplied changes are kept (and said) until `vmctl apply` or `vmctl rm`;
    `drop_changes` (`--discard`) drops them, audited; a copy with nothing to
    land just goes.
    """
    from vmctl.review.changes import changes

    if not exists(name):
        return None
    pending = changes(load(name))
    if drop_changes:
        discard(name, len(pending))
        return f"{name}: review copy discarded ({len(pending)} unapplied change(s) dropped)"
    if not pending:
        drop(name)
        return None
    return (
        f"{name}: {len(pending)} unapplied change(s) kept in its review copy until "
        f"`vmctl apply {name}` or `vmctl rm {name}` (see `vmctl diff {name}`)"
    )


def drop_if_clean(name: str) -> None:
    """Make room for a new review of `name`, refusing to lose unapplied changes."""
    from vmctl.review.changes import changes

    if not exists(name):
        drop(name)
        return
    pending = changes(load(name))
    if pending:
        raise VMError(
            f"{name!r} has {len(pending)} unapplied change(s) from its last review",
            f"vmctl diff {name}; then vmctl apply {name} or vmctl rm {name}",
        )
    drop(name)
