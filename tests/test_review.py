"""Review mode's library, with the guest's 9p writes made by hand.

A mapped-xattr guest's chmod, symlink and mknod reach the host only as
`user.virtfs.mode` xattrs on plain files; these tests plant exactly that
(what QEMU writes), so the rules are pinned without a boot. The real guest
runs in tests/test_review_guest.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vmctl import events, paths
from vmctl.errors import ConfigError, VMError
from vmctl.review import changes, land, snapshot
from vmctl.review.entries import MODE_XATTR


def mapped(path: Path, mode: int, content: bytes = b"") -> None:
    """What QEMU's mapped-xattr model leaves on the host for a guest-made node."""
    path.write_bytes(content)
    os.setxattr(path, MODE_XATTR, mode.to_bytes(4, "little"))


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    ws = tmp_path / "project"
    (ws / "src").mkdir(parents=True)
    (ws / "src" / "app.py").write_text("print('hello')\n")
    (ws / "README").write_text("read me\n")
    (ws / "old.txt").write_text("to be deleted\n")
    (ws / "run.sh").write_text("#!/bin/sh\n")
    (ws / "blob.bin").write_bytes(b"\0\1\2")
    return ws


def test_snapshot_copies_and_reports_cost(ws: Path) -> None:
    review, cost = snapshot.create("box", ws)
    assert (review.paths.work / "src" / "app.py").read_text() == "print('hello')\n"
    assert cost.files == 5 and cost.bytes > 0 and "copy" in cost.method
    assert changes.changes(snapshot.load("box")) == []


def test_diff_shows_edit_new_delete_mode(ws: Path) -> None:
    review, _ = snapshot.create("box", ws)
    work = review.paths.work
    (work / "src" / "app.py").write_text("print('hello, world')\n")
    (work / "new.txt").write_text("brand new\n")
    (work / "old.txt").unlink()
    os.setxattr(work / "run.sh", MODE_XATTR, (stat.S_IFREG | 0o755).to_bytes(4, "little"))
    found = {c.path: c for c in changes.changes(snapshot.load("box"))}
    assert {p: c.kind for p, c in found.items()} == {
        "src/app.py": "modified",
        "new.txt": "added",
        "old.txt": "deleted",
        "run.sh": "mode",
    }
    text = changes.unified(review, found["src/app.py"])
    assert "-print('hello')" in text and "+print('hello, world')" in text
    assert "0644 -> 0755" in changes.stat_line(found["run.sh"])


def test_git_config_and_hooks_never_land(ws: Path, tmp_path: Path) -> None:
    """An agent's core.fsmonitor or hook would run on the host's next `git status`."""
    import shutil
    import subprocess

    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    subprocess.run([git, "init", "-q", str(ws)], check=True)
    review, _ = snapshot.create("box", ws)
    marker = tmp_path / "PWNED"
    work = review.paths.work
    with (work / ".git" / "config").open("a") as f:
        f.write(f'[core]\n\tfsmonitor = "touch {marker} #"\n')
    (work / ".git" / "hooks" / "pre-commit").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (work / "sub").mkdir()
    (work / "sub" / ".git").write_text(f"gitdir: {tmp_path}\n")
    (work / "README").write_text("agent\n")
    out = land.apply(snapshot.load("box"))
    assert sorted(p for p, _ in out.refused) == [".git/config", ".git/hooks/pre-commit", "sub/.git"]
    assert "README" in out.applied and (ws / "README").read_text() == "agent\n"
    subprocess.run([git, "-C", str(ws), "status"], capture_output=True, check=True)
    assert not marker.exists() and "fsmonitor" not in (ws / ".git" / "config").read_text()


def test_apply_one_path_lands_only_that(ws: Path) -> None:
    review, _ = snapshot.create("box", ws)
    (review.paths.work / "src" / "app.py").write_text("edited\n")
    (review.paths.work / "README").write_text("agent readme\n")
    out = land.apply(snapshot.load("box"), ["src/app.py"])
    assert out.applied == ["src/app.py"] and not out.conflicts
    assert (ws / "src" / "app.py").read_text() == "edited\n"
    assert (ws / "README").read_text() == "read me\n"
    assert [c.path for c in changes.changes(snapshot.load("box"))] == ["README"]


def test_conflicting_user_edit_is_refused_and_listed(ws: Path) -> None:
    review, _ = snapshot.create("box", ws)
    (review.paths.work / "README").write_text("agent readme\n")
    (ws / "README").write_text("the user's own edit\n")
    (change,) = changes.changes(snapshot.load("box"))
    shown = changes.unified(snapshot.load("box"), change)
    assert "apply will refuse it" in shown and "no text diff" in shown and "binary" not in shown
    out = land.apply(snapshot.load("box"))
    assert out.applied == [] and [p for p, _ in out.conflicts] == ["README"]
    assert (ws / "README").read_text() == "the user's own edit\n"


def test_paths_outside_or_unknown_to_the_review_are_named(ws: Path) -> None:
    review, _ = snapshot.create("box", ws)
    (review.paths.work / "README").write_text("agent readme\n")
    for path, said in (("/etc/passwd", "outside the workspace"), ("../x", "outside"),
                       ("typo.txt", "in neither the review copy nor its snapshot")):  # fmt: skip
        with pytest.raises(ConfigError, match=said):
            land.apply(snapshot.load("box"), [path])
    assert [c.path for c in changes.changes(snapshot.load("box"), [f"{ws}/README"])] == ["README"]
    assert [c.path for c in changes.changes(snapshot.load("box"), ["/workspace/src"])] == []


def test_hostile_nodes_never_land(ws: Path) -> None:
    review, _ = snapshot.create("box", ws)
    work = review.paths.work
    mapped(work / "passwd", stat.S_IFLNK | 0o777, b"/etc/passwd")
    mapped(work / "up", stat.S_IFLNK | 0o777, b"../../outside")
    mapped(work / "ok-link", stat.S_IFLNK | 0o777, b"src/app.py")
    mapped(work / "sda", stat.S_IFBLK | 0o660)
    mapped(work / "suid", stat.S_IFREG | 0o4755, b"#!/bin/sh\n")
    out = land.apply(snapshot.load("box"))
    assert sorted(p for p, _ in out.refused) == ["passwd", "sda", "up"]
    assert not (ws / "passwd").exists() and not (ws / "passwd").is_symlink()
    assert not (ws / "sda").exists() and not (ws / "up").is_symlink()
    assert os.readlink(ws / "ok-link") == "src/app.py"
    assert stat.S_IMODE((ws / "suid").stat().st_mode) == 0o755
    assert any("suid" in n for n in out.notes)


def test_apply_never_writes_through_a_symlinked_parent(ws: Path, tmp_path: Path) -> None:
    review, _ = snapshot.create("box", ws)
    (review.paths.work / "src" / "app.py").write_text("edited\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (ws / "src" / "app.py").rename(outside / "app.py")
    (ws / "src").rmdir()
    (ws / "src").symlink_to(outside)
    out = land.apply(snapshot.load("box"))
    assert [p for p, _ in out.conflicts] == ["src/app.py"]
    assert (outside / "app.py").read_text() == "print('hello')\n"


def test_new_review_refuses_to_drop_unapplied_changes(ws: Path) -> None:
    review, _ = snapshot.create("box", ws)
    (review.paths.work / "new.txt").write_text("x\n")
    with pytest.raises(VMError, match="unapplied"):
        snapshot.create("box", ws)
    land.apply(snapshot.load("box"))
    snapshot.create("box", ws)  # applied: a fresh copy replaces it
    assert (ws / "new.txt").read_text() == "x\n"


def test_new_folders_and_deleted_folders(ws: Path) -> None:
    review, _ = snapshot.create("box", ws)
    work = review.paths.work
    (work / "pkg" / "sub").mkdir(parents=True)
    (work / "pkg" / "sub" / "mod.py").write_text("x = 1\n")
    (work / "src" / "app.py").unlink()
    (work / "src").rmdir()
    out = land.apply(snapshot.load("box"), ["pkg/sub/mod.py"])
    assert out.applied == ["pkg/sub/mod.py"]
    assert (ws / "pkg" / "sub" / "mod.py").read_text() == "x = 1\n"
    assert (ws / "src" / "app.py").exists(), "only the named path lands"
    out = land.apply(snapshot.load("box"))
    assert sorted(out.applied) == ["src", "src/app.py"] and not (ws / "src").exists()
    assert changes.changes(snapshot.load("box")) == []
    logged = [e for e in events.read_file(events.subject_file(paths.events_dir(), "guest", "box"))]
    assert [e.action for e in logged] == ["apply", "apply"] and "src/app.py" in str(
        logged[-1].detail
    )


def test_cli_diff_stat_escapes_guest_names_and_apply_lists_conflicts(ws: Path) -> None:
    import subprocess
    import sys

    review, _ = snapshot.create("box", ws)
    (review.paths.work / "evil\x1b[2J.txt").write_text("x\n")
    (review.paths.work / "README").write_text("agent\n")
    (ws / "README").write_text("user\n")
    env = {**os.environ}

    def vmctl(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "vmctl", *args]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    out = vmctl("diff", "box", "--stat").stdout
    assert "\x1b" not in out and "A evil\\x1b[2J.txt" in out and "M README" in out
    r = vmctl("apply", "box")
    assert r.returncode == 1 and "conflict  README: the user changed it" in r.stdout
    assert "hint:" in r.stderr and "Traceback" not in r.stderr
    assert vmctl("diff", "nosuch").stderr.startswith("error: no review copy for 'nosuch'")


def test_cli_apply_escapes_guest_names(ws: Path) -> None:
    """`vmctl apply` lists what landed by name: a guest-made name must not drive the terminal."""
    import subprocess
    import sys

    review, _ = snapshot.create("box", ws)
    (review.paths.work / "t\x1b]2;pwned\x07.txt").write_text("x\n")
    os.symlink("/etc/passwd", review.paths.work / "l\x1b[2J")
    argv = [sys.executable, "-m", "vmctl", "apply", "box"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "applied   t\\x1b]2;pwned\\x07.txt" in r.stdout
    assert "refused   l\\x1b[2J: symlink" in r.stdout
    assert (ws / "t\x1b]2;pwned\x07.txt").read_text() == "x\n"  # the file itself lands


def test_discard_drops_the_copy_and_says_so_in_the_log(ws: Path) -> None:
    review, _ = snapshot.create("box", ws)
    (review.paths.work / "new.txt").write_text("x\n")
    snapshot.discard("box", 1)
    assert not review.paths.root.exists() and not (ws / "new.txt").exists()
    log = events.read_file(events.subject_file(paths.events_dir(), "guest", "box"))
    assert [(e.action, e.detail) for e in log] == [
        ("discard", "1 unapplied change(s) of the review copy dropped")
    ]


def test_settle_keeps_changes_and_says_so_drops_a_clean_copy_or_discards(ws: Path) -> None:
    review, _ = snapshot.create("box", ws)
    assert snapshot.settle("box", drop_changes=False) is None  # nothing changed: it just goes
    assert not review.paths.root.exists()
    review, _ = snapshot.create("box", ws)
    (review.paths.work / "new.txt").write_text("x\n")
    line = snapshot.settle("box", drop_changes=False)
    assert line is not None and "1 unapplied change(s) kept" in line and review.paths.root.exists()
    line = snapshot.settle("box", drop_changes=True)
    assert line == "box: review copy discarded (1 unapplied change(s) dropped)"
    assert not review.paths.root.exists() and not (ws / "new.txt").exists()
