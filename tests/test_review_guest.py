"""Review mode end to end: a real micro guest under TCG edits its private copy.

One boot (`--review --ephemeral --detach`, no network) carries the whole
story: the agent edits, adds, deletes, changes a mode and plants a symlink
to /etc/passwd; `diff` shows it; `apply` of one path lands only that path;
a file the user edited meanwhile is a listed conflict; `down` keeps the
copy and says so; `apply` still works after `down`; `rm` removes the copy.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need
from guests import VMCTL, vmctl
from vmctl.images.choose import resolve_image

pytestmark = pytest.mark.qemu
#: Software emulation, as CI has it (a cached KVM probe can be wrong on nested hosts).
TCG = ("--accel", "tcg", "--timeout", "120")

AGENT = """
cd /workspace
echo 'print("hello, agent")' > app.py.new && mv app.py.new app.py
echo 'agent readme' > README.new && mv README.new README
echo 'agent other' > other.txt.new && mv other.txt.new other.txt
echo 'brand new' > new.txt
rm old.txt
# the mode is set on /tmp and carried by cp's create (chmod on the share needs ownership)
cp run.sh /tmp/run.sh && chmod 755 /tmp/run.sh && cp /tmp/run.sh run.sh.new && mv run.sh.new run.sh
ln -s /etc/passwd evil
"""


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    need(bool(subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).stdout), "qemu")
    home = tmp_path / "h"
    home.mkdir()
    os.environ.setdefault("VMCTL_CACHE", str(Path.home() / ".cache/vmctl"))
    e = {**os.environ, "VMCTL_HOME": str(home), "VMCTL_QUIET": "1"}
    e["TEST_MANIFEST"] = str(resolve_image("micro").path)
    yield e
    for root in (home / "instances").glob("*"):
        subprocess.run([*VMCTL, "down", root.name], env=e, timeout=60, check=False)


def test_review_diff_apply_conflict_down_rm(env: dict[str, str], tmp_path: Path) -> None:
    ws = tmp_path / "project"
    ws.mkdir()
    for name, text in [
        ("app.py", 'print("hello")\n'),
        ("README", "readme\n"),
        ("other.txt", "other\n"),
        ("old.txt", "old\n"),
        ("run.sh", "#!/bin/sh\n"),
    ]:
        (ws / name).write_text(text)  # fmt: skip
    up = ["up", "-d", str(ws), "--name", "rev", "--image", env["TEST_MANIFEST"]]
    r = vmctl(env, *up, "--review", "--ephemeral", "--detach", "--net", "none", *TCG)
    assert r.returncode == 0, r.stderr
    again = vmctl(env, *up, "--review", "--net", "none", *TCG)
    assert again.returncode != 0 and "is running" in again.stderr
    assert (Path(env["VMCTL_HOME"]) / "reviews" / "rev" / "work" / "app.py").exists()
    mirror = json.loads(vmctl(env, "status", "rev", "--json").stdout)["mirror"]
    assert mirror["state"] == "off" and "--net none" in mirror["why"]
    r = vmctl(env, "exec", "rev", "--", "sh", "-c", AGENT)
    assert r.returncode == 0, r.stdout
    assert (ws / "app.py").read_text() == 'print("hello")\n', "the guest wrote to the user's folder"
    (ws / "README").write_text("the user's own edit\n")

    r = vmctl(env, "diff", "rev", "--json")
    found = {c["path"]: c for c in json.loads(r.stdout)["changes"]}
    kinds = {p: c["change"] for p, c in found.items()}
    assert kinds == {"app.py": "modified", "README": "modified", "other.txt": "modified",
                     "new.txt": "added", "old.txt": "deleted", "run.sh": "mode",
                     "evil": "added"}, kinds  # fmt: skip
    assert '+print("hello, agent")' in found["app.py"]["diff"]
    assert found["run.sh"]["new"]["mode"] == "0755" and found["run.sh"]["old"]["mode"] == "0644"
    assert found["evil"]["new"]["type"] == "link" and found["evil"]["refused"]

    r = vmctl(env, "apply", "rev", "app.py")
    assert r.returncode == 0, r.stderr
    assert (ws / "app.py").read_text() == 'print("hello, agent")\n'
    assert (ws / "other.txt").read_text() == "other\n" and (ws / "old.txt").exists()
    r = vmctl(env, "apply", "rev", "README")
    assert r.returncode == 1 and "conflict  README" in r.stdout
    assert (ws / "README").read_text() == "the user's own edit\n"

    r = vmctl(env, "down", "rev")
    assert r.returncode == 0 and "unapplied change(s) kept" in r.stdout, r.stdout
    assert not (Path(env["VMCTL_HOME"]) / "instances" / "rev").exists()
    r = vmctl(env, "apply", "rev", "--json")
    out = json.loads(r.stdout)
    assert sorted(out["applied"]) == ["new.txt", "old.txt", "other.txt", "run.sh"]
    assert [c["path"] for c in out["conflicts"]] == ["README"]
    assert [c["path"] for c in out["refused"]] == ["evil"]
    assert (ws / "other.txt").read_text() == "agent other\n" and not (ws / "old.txt").exists()
    assert (ws / "run.sh").stat().st_mode & 0o7777 == 0o755
    assert not (ws / "evil").exists() and not (ws / "evil").is_symlink()

    assert vmctl(env, "rm", "rev").returncode == 0
    assert not (Path(env["VMCTL_HOME"]) / "reviews" / "rev").exists()
    assert vmctl(env, "diff", "rev").returncode != 0


def test_stop_is_down_for_a_review_guest_and_a_kept_copy_stays_visible(
    env: dict[str, str], tmp_path: Path
) -> None:
    ws = tmp_path / "project"
    ws.mkdir()
    (ws / "app.py").write_text("v1\n")
    up = ["up", "-d", str(ws), "--name", "rev2", "--image", env["TEST_MANIFEST"]]
    r = vmctl(env, *up, "--review", "--ephemeral", "--detach", "--net", "none", *TCG)
    assert r.returncode == 0, r.stderr
    r = vmctl(env, "exec", "rev2", "--", "sh", "-c", "echo v2 > /workspace/app.py")
    assert r.returncode == 0, r.stderr

    r = vmctl(env, "stop", "rev2")  # the shared verb keeps the changes, and says so, as `down`
    assert r.returncode == 0 and "1 unapplied change(s) kept" in r.stdout, r.stdout + r.stderr
    status = json.loads(vmctl(env, "status", "rev2", "--json").stdout)
    assert status["kind"] == "review" and str(ws) in status["review"]
    listed = json.loads(vmctl(env, "ls", "-a", "--json").stdout)["reviews"]
    assert listed == [{"name": "rev2", "source": str(ws)}]
    for verb in ("stop", "down"):
        again = vmctl(env, verb, "rev2")
        assert again.returncode != 0 and "Traceback" not in again.stderr
        assert "kept review copy" in again.stderr and "vmctl apply rev2" in again.stderr
        assert "stopping" not in again.stderr  # one line, not a failed step first
    assert (ws / "app.py").read_text() == "v1\n"
    assert vmctl(env, "apply", "rev2").returncode == 0
    assert (ws / "app.py").read_text() == "v2\n"
    assert vmctl(env, "rm", "rev2").returncode == 0
    assert "rev2" not in vmctl(env, "ls", "-a").stdout
