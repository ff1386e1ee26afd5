"""The workspace is the user's folder, read-write, for any host user.

One real micro guest per host user (root, and uid 501 created here as on a
Mac's first account), booted and driven through the `vmctl` CLI run as that
user, over each workspace transport (9p, and virtio-fs for root and uid
501). The agent (what `vmctl exec` runs as) must be able to change the
user's files; what it makes must be the user's on the host; nothing the
guest does may become a setuid bit, device node, fifo or foreign owner on
the host, and no symlink may read through to a host file outside the
workspace. docs/guest-contract.md ("Whose files", "The transport")
explains the mechanism.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import need
from vmctl import contract
from vmctl.images.choose import resolve_image
from vmctl.vm import virtiofs

pytestmark = pytest.mark.qemu
TEST_UID = 501
TEST_USER = "vmctl501"
AGENT = contract.raw()["user"]


@dataclass
class HostUser:
    """vmctl run as one host user, with its own state folder and workspace."""

    uid: int
    gid: int
    env: dict[str, str]
    ws: Path
    #: The ids the guest shows for this user's files (the agent's).
    seen_as: tuple[int, int]
    #: The workspace transport (`vmctl up --share`).
    share: str = "9p"

    def argv(self, *args: str) -> list[str]:
        if self.uid == os.geteuid():
            return list(args)
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", *args]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def vmctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run(*python_for(self.uid), "-m", "vmctl", *args, timeout=timeout)

    def guest(self, script: str) -> str:
        r = self.vmctl("exec", "box", "--", "sh", "-c", f"cd /workspace && {script}")
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout


def python_for(uid: int) -> list[str]:
    """An interpreter `uid` may execute, with vmctl importable (PYTHONPATH in `env_for`).

    The test venv's interpreter may live under root's home (pyenv), which
    another user cannot enter: a real user runs their own install. Here the
    other user gets Debian's python3 (same minor version) on the same
    site-packages, so every process vmctl starts with sys.executable works.
    """
    if uid == os.geteuid():
        return [sys.executable]
    for candidate in ("/usr/bin/python3", shutil.which("python3")):
        if candidate and os.path.exists(candidate):
            return [candidate]
    return [sys.executable]


def env_for(uid: int) -> dict[str, str]:
    if uid == os.geteuid():
        return {}
    where = [str(Path(contract.__file__).resolve().parents[1]), sysconfig.get_paths()["purelib"]]
    return {"PYTHONPATH": os.pathsep.join(where)}


def make_test_user() -> tuple[int, int]:
    """uid 501 (group 501 when free), created once; root only."""
    try:
        return TEST_UID, pwd.getpwuid(TEST_UID).pw_gid
    except KeyError:
        pass
    gid = ["-g", str(TEST_UID)] if not _group_exists(TEST_UID) else []
    subprocess.run(["groupadd", *gid, TEST_USER], check=True, capture_output=True)
    shell = ["-s", "/usr/sbin/nologin", "-d", "/nonexistent", "-M"]
    subprocess.run(
        ["useradd", "-u", str(TEST_UID), "-g", TEST_USER, *shell, TEST_USER],
        check=True,
        capture_output=True,
    )
    return TEST_UID, pwd.getpwuid(TEST_UID).pw_gid


def _group_exists(gid: int) -> bool:
    import grp

    try:
        grp.getgrgid(gid)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def image() -> Iterator[Path]:
    """A world-readable copy of the micro image (the cache is private to root)."""
    need(shutil.which("qemu-system-x86_64") is not None, "qemu")
    need(sys.platform.startswith("linux"), "user namespaces are Linux-only")
    need(shutil.which("setpriv") is not None, "setpriv (util-linux)")
    manifest = resolve_image("micro", ()).path  # no agent shares: the copy stays small
    top = Path(tempfile.mkdtemp(prefix="vmctl-ws-img-", dir="/tmp"))
    try:
        shutil.copytree(manifest.parent, top / "micro")
        for p in [top, *top.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        yield top / "micro" / manifest.name
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(
    scope="module", params=["root", "uid501", "uid501-lima", "root-virtiofs", "uid501-virtiofs"]
)
def user(request: pytest.FixtureRequest, image: Path) -> Iterator[HostUser]:
    """One guest per host user and transport; its workspace holds files that user made.

    `uid501-lima` forces the fallback for hosts without user namespaces
    (macOS): the guest's agent takes the host user's uid/gid.
    """
    need(os.geteuid() == 0, "running vmctl as root and creating a test user need root")
    share = "virtiofs" if request.param.endswith("-virtiofs") else "9p"
    if share == "virtiofs":
        need(virtiofs.find_daemon() is not None, "virtiofsd (qemu-system-common)")
    uid, gid = (0, 0) if request.param.startswith("root") else make_test_user()
    top = Path(tempfile.mkdtemp(prefix="vmctl-ws-", dir="/tmp"))
    top.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMCTL_")}
    env.update(VMCTL_HOME=str(top / "home"), VMCTL_CACHE=str(top / "cache"), VMCTL_QUIET="1")
    seen_as = (int(AGENT["uid"]), int(AGENT["gid"]))
    if request.param == "uid501-lima":
        env["VMCTL_IDMAP"] = "guest"
        seen_as = (uid, gid)
    env["HOME"] = str(top)
    env.update(env_for(uid))
    ws = top / "ws"
    (ws / "hostdir").mkdir(parents=True)
    for name, text in [("pre.txt", "by the host\n"), ("overwrite.txt", "old\n")]:
        (ws / name).write_text(text)
    (ws / "renameme.txt").write_text("rename me\n")
    (ws / "deleteme.txt").write_text("delete me\n")
    (ws / "private.txt").write_text("mine only\n")
    (ws / "private.txt").chmod(0o600)
    (ws / "run.sh").write_text("#!/bin/sh\necho ran from the host\n")
    (ws / "run.sh").chmod(0o755)
    (top / "secret").write_text("outside the workspace\n")
    (ws / "abs-link").symlink_to(top / "secret")
    (ws / "rel-link").symlink_to("../secret")
    for p in [top, *top.rglob("*")]:
        os.chown(p, uid, gid, follow_symlinks=False)
    host = HostUser(uid, gid, env, ws, seen_as, share)
    up = ["up", "-d", str(ws), "--name", "box", "--image", str(image), "--accel", "tcg"]
    up += ["--share", share]
    r = host.vmctl(*up, "--detach", "--timeout", "120", timeout=180)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        yield host
    finally:
        host.vmctl("down", "box", timeout=60)
        shutil.rmtree(top, ignore_errors=True)


def owned_by(host: HostUser, path: Path) -> bool:
    st = path.lstat()
    return (st.st_uid, st.st_gid) == (host.uid, host.gid)


def test_host_files_are_the_agents_in_the_guest(user: HostUser) -> None:
    out = user.guest("id -u; id -g; stat -c '%u:%g %a' pre.txt private.txt hostdir .")
    ids = "{}:{}".format(*user.seen_as)
    assert out.split("\n") == [
        str(user.seen_as[0]),
        str(user.seen_as[1]),
        f"{ids} 644",
        f"{ids} 600",
        f"{ids} 755",
        f"{ids} 755",
        "",
    ]


def test_agent_edits_the_users_files(user: HostUser) -> None:
    ws = user.ws
    script = (
        "cat pre.txt private.txt; echo appended >> pre.txt; echo new > overwrite.txt;"
        " echo a > new.txt; echo b >> new.txt; echo c >> private.txt;"
        " mv renameme.txt renamed.txt; rm deleteme.txt;"
        " mkdir -p a/b/c; echo deep > a/b/c/deep.txt; echo in > hostdir/inner.txt;"
        " echo done"
    )
    assert user.guest(script) == "by the host\nmine only\ndone\n"
    assert (ws / "pre.txt").read_text() == "by the host\nappended\n"
    assert (ws / "overwrite.txt").read_text() == "new\n"
    assert (ws / "new.txt").read_text() == "a\nb\n"
    assert (ws / "private.txt").read_text() == "mine only\nc\n"
    assert (ws / "renamed.txt").read_text() == "rename me\n"
    assert not (ws / "renameme.txt").exists() and not (ws / "deleteme.txt").exists()
    assert (ws / "a/b/c/deep.txt").read_text() == "deep\n"
    assert (ws / "hostdir/inner.txt").read_text() == "in\n"
    for made in ["new.txt", "a/b/c/deep.txt", "hostdir/inner.txt"]:
        assert owned_by(user, ws / made), made
        assert (ws / made).lstat().st_mode == 0o100644, made
    for made in ["a", "a/b", "a/b/c"]:
        assert owned_by(user, ws / made), made
        assert (ws / made).lstat().st_mode == 0o040755, made
    for kept in ["pre.txt", "overwrite.txt", "private.txt", "renamed.txt"]:
        assert owned_by(user, ws / kept), kept
    assert (ws / "private.txt").stat().st_mode & 0o777 == 0o600


def test_file_the_host_makes_while_the_guest_runs(user: HostUser) -> None:
    live = user.ws / "live.txt"
    r = user.run("sh", "-c", f"echo live > {live}")
    assert r.returncode == 0, r.stderr
    out = user.guest("stat -c '%u' live.txt; echo more >> live.txt; mv live.txt live2.txt; echo ok")
    assert out == f"{user.seen_as[0]}\nok\n"
    assert (user.ws / "live2.txt").read_text() == "live\nmore\n"
    assert owned_by(user, user.ws / "live2.txt")


def test_nothing_special_reaches_the_host(user: HostUser) -> None:
    if user.share == "virtiofs":
        return nothing_special_over_virtiofs(user)
    ws = user.ws
    script = (
        "echo x > suid; chmod 4755 suid; echo x > sgid; chmod 2755 sgid;"
        " mkdir sgid-dir; chmod 2775 sgid-dir; ln -s /etc/passwd guest-link; mkfifo fifo;"
        " stat -c '%a %F' suid sgid sgid-dir guest-link fifo;"
        " cat abs-link rel-link 2>/dev/null; echo end"
    )
    out = user.guest(script).splitlines()
    # Inside the guest the agent sees what it asked for...
    assert out[:5] == [
        "4755 regular file",
        "2755 regular file",
        "2775 directory",
        "777 symbolic link",
        "644 fifo",
    ]
    # ...and a host symlink leading out of the workspace leads nowhere there.
    assert out[5:] == ["end"]
    # On the host: plain files and folders of the user, ordinary modes (the x
    # bits of a regular file cross, never setuid/setgid: vmctl.sidecars.modes).
    for name, mode in [("suid", 0o100755), ("sgid", 0o100755), ("guest-link", 0o100644)]:
        assert (ws / name).lstat().st_mode == mode, name
        assert owned_by(user, ws / name)
    assert (ws / "fifo").lstat().st_mode == 0o100644
    assert (ws / "sgid-dir").lstat().st_mode == 0o040755
    assert (ws / "guest-link").read_text() == "/etc/passwd"


def nothing_special_over_virtiofs(user: HostUser) -> None:
    """virtio-fs has no mapped modes: what would be special is refused outright.

    Its daemon's seccomp filter refuses setuid/setgid/sticky bits and
    mknod; its user namespace refuses foreign owners and device nodes; its
    own sandbox and the guest's resolving keep symlinks from reading through.
    """
    ws = user.ws
    script = (
        "echo x > suid; chmod 4755 suid; echo x > sgid; chmod 2755 sgid; mkdir sgid-dir;"
        " chmod 2775 sgid-dir; chmod 1777 sgid-dir; mkfifo fifo; chown 0 suid; echo end"
    )
    out = user.guest("{ " + script + "; } 2>&1").splitlines()
    assert out[-1] == "end" and len(out) == 7, out  # six refusals, then the end
    assert all("Operation not permitted" in line for line in out[:6]), out
    assert user.guest("stat -c '%a %u' suid sgid sgid-dir") == "644 {0}\n644 {0}\n755 {0}\n".format(
        user.seen_as[0]
    )
    for name, mode in [("suid", 0o100644), ("sgid", 0o100644), ("sgid-dir", 0o040755)]:
        assert (ws / name).lstat().st_mode == mode, name
        assert owned_by(user, ws / name), name
    assert not (ws / "fifo").exists()
    # Symlinks are real (npm's .bin, venvs), and resolved inside the guest:
    # the host's own links and the guest's never reach a host file outside.
    out = user.guest(
        "ln -s /etc/passwd guest-link; ln -s ../secret guest-rel; cat guest-link >/dev/null &&"
        " echo guest-passwd; cat abs-link rel-link guest-rel 2>/dev/null; echo end"
    )
    assert out == "guest-passwd\nend\n"
    assert os.readlink(ws / "guest-link") == "/etc/passwd"
    assert owned_by(user, ws / "guest-link")


def test_executable_bits(user: HostUser) -> None:
    """The x bits cross both ways: see docs/guest-contract.md, "The executable bit"."""
    ws = user.ws
    # The host's x bit on a file the host made reaches the guest, and runs there.
    out = user.guest("stat -c %a run.sh; ./run.sh")
    assert out == "755\nran from the host\n"
    # The guest's chmod +x on a file the host made, on a file it made, and a
    # file it creates executable (cp keeps the source's mode, as a linker's
    # output would be): executable on the host as soon as exec returns.
    r = user.run("sh", "-c", f"printf '#!/bin/sh\\necho host\\n' > {ws}/h.sh")
    assert r.returncode == 0, r.stderr
    script = (
        "chmod +x h.sh; printf '#!/bin/sh\\necho ran\\n' > g.sh; chmod 755 g.sh;"
        " printf '#!/bin/sh\\necho made\\n' > /tmp/m; chmod 755 /tmp/m; cp /tmp/m m.sh;"
        " echo n > n.txt; ./g.sh"
    )
    assert user.guest(script) == "ran\n"
    for name in ["h.sh", "g.sh", "m.sh"]:
        assert (ws / name).stat().st_mode == 0o100755, name
        assert owned_by(user, ws / name), name
    r = user.run(str(ws / "m.sh"))
    assert (r.returncode, r.stdout) == (0, "made\n")
    if user.share == "virtiofs":
        return executable_bits_over_virtiofs(user)
    # A host chmod of a file the guest made: its x bits are what the guest sees
    # next (only the x bits: g.sh keeps the guest's r/w bits, 0744).
    assert user.run("chmod", "700", str(ws / "g.sh")).returncode == 0
    assert user.run("chmod", "+x", str(ws / "n.txt")).returncode == 0
    out = user.guest("stat -c %a g.sh n.txt; test -x n.txt && echo x")
    assert out == "744\n755\nx\n"
    # chmod -x in the guest takes it away on the host; setuid never arrives.
    assert user.guest("chmod -x g.sh; chmod 4755 h.sh; stat -c %a g.sh h.sh") == "644\n4755\n"
    assert (ws / "g.sh").stat().st_mode == 0o100600
    assert (ws / "h.sh").stat().st_mode == 0o100755


def executable_bits_over_virtiofs(user: HostUser) -> None:
    """virtio-fs carries the real mode: a host chmod shows in the guest within its
    one-second attribute cache (`cache=auto`), a guest chmod on the host at once."""
    ws = user.ws
    assert user.run("chmod", "700", str(ws / "g.sh")).returncode == 0
    assert user.run("chmod", "+x", str(ws / "n.txt")).returncode == 0
    deadline = time.monotonic() + 5
    while True:
        out = user.guest("stat -c %a g.sh n.txt; test -x n.txt && echo x")
        if out == "700\n755\nx\n" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert out == "700\n755\nx\n"
    assert user.guest("chmod -x g.sh; chmod 4755 h.sh 2>/dev/null; stat -c %a g.sh h.sh") == (
        "600\n755\n"
    )
    assert (ws / "g.sh").stat().st_mode == 0o100600
    assert (ws / "h.sh").stat().st_mode == 0o100755
