"""The virtio-fs workspace's confinement and choice, without a guest.

The seccomp filter is applied for real to a child process here and must
refuse exactly what a hostile guest would ask the daemon for; the choice
of transport must refuse what the host or image cannot do, in one line.
Real guests over virtio-fs: tests/test_workspace.py and tests/test_vm.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vmctl import contract
from vmctl.errors import ConfigError
from vmctl.sandbox import seccomp
from vmctl.vm import virtiofs
from vmctl.vm.idmap import IdMap

USERNS = IdMap("userns", 1000, 1000, ("/usr/bin/unshare", "--user", "--"))
PROBE = textwrap.dedent(
    """
    import errno, os, sys
    from vmctl.sandbox import seccomp
    d = sys.argv[1]
    seccomp.install()
    def t(name, f):
        try:
            f()
            print(f"{name}|ok")
        except OSError as e:
            print(f"{name}|{errno.errorcode[e.errno]}")
    t("write", lambda: open(f"{d}/a", "w").write("x"))
    t("chmod 755", lambda: os.chmod(f"{d}/a", 0o755))
    t("chmod 4755", lambda: os.chmod(f"{d}/a", 0o4755))
    t("chmod 2755", lambda: os.chmod(f"{d}/a", 0o2755))
    t("chmod 1755", lambda: os.chmod(f"{d}/a", 0o1755))
    t("fchmodat 4755", lambda: os.chmod("a", 0o4755, dir_fd=os.open(d, os.O_RDONLY)))
    t("create 4755", lambda: os.close(os.open(f"{d}/s", os.O_CREAT | os.O_WRONLY, 0o4755)))
    t("create 644", lambda: os.close(os.open(f"{d}/n", os.O_CREAT | os.O_WRONLY, 0o644)))
    t("open no-create", lambda: os.close(os.open(f"{d}/n", os.O_RDONLY)))
    t("mkdir 755", lambda: os.mkdir(f"{d}/dir", 0o755))
    t("mkdir 2755", lambda: os.mkdir(f"{d}/sdir", 0o2755))
    t("mkfifo", lambda: os.mkfifo(f"{d}/fifo"))
    t("mknod sock", lambda: os.mknod(f"{d}/sock", 0o140644))
    t("symlink", lambda: os.symlink("/etc/passwd", f"{d}/link"))
    t("link", lambda: os.link(f"{d}/n", f"{d}/hard"))
    print(f"getgroups|{os.getgroups()}")
    """
)


@pytest.mark.skipif(not seccomp.supported(), reason="seccomp filter is Linux x86_64/aarch64")
def test_filter_refuses_special_files_and_mode_bits(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(contract.__file__).parents[1])}
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    got = dict(line.split("|") for line in r.stdout.splitlines())
    assert got == {
        "write": "ok", "chmod 755": "ok", "chmod 4755": "EPERM", "chmod 2755": "EPERM",
        "chmod 1755": "EPERM", "fchmodat 4755": "EPERM", "create 4755": "EPERM",
        "create 644": "ok", "open no-create": "ok", "mkdir 755": "ok", "mkdir 2755": "EPERM",
        "mkfifo": "EPERM", "mknod sock": "EPERM", "symlink": "ok", "link": "ok",
        "getgroups": "[]",  # so virtiofsd need not drop groups a user namespace keeps
    }  # fmt: skip
    assert not (tmp_path / "fifo").exists() and not (tmp_path / "s").exists()
    assert (tmp_path / "a").stat().st_mode & 0o7777 == 0o755


def test_filter_is_assembled_for_both_arches_and_nothing_else() -> None:
    for arch in ("x86_64", "aarch64"):
        prog = seccomp.program(arch)
        assert len(prog) % 8 == 0 and 8 < len(prog) // 8 < 256
    with pytest.raises(ValueError):
        seccomp.program("riscv64")


def test_share_auto_is_the_contracts_default_and_typos_are_one_line() -> None:
    assert virtiofs.requested("auto") == contract.default_transport() == "9p"
    assert virtiofs.requested("virtiofs") == "virtiofs"
    with pytest.raises(ConfigError, match="--share 'vfs' is not one of auto, 9p, virtiofs"):
        virtiofs.requested("vfs")
    with pytest.raises(ConfigError, match="--review") as e:
        virtiofs.requested("virtiofs", review=True)
    assert "drop --share virtiofs" in (e.value.hint or "")


def test_unsupported_hosts_and_images_are_refused_never_downgraded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match="image's guest cannot mount virtio-fs") as e:
        virtiofs.check(USERNS, ("9p",))
    assert "--share 9p" in (e.value.hint or "")
    lima = IdMap("guest", 501, 20)
    with pytest.raises(ConfigError, match="needs user namespaces"):
        virtiofs.check(lima, ("9p", "virtiofs"))
    monkeypatch.setattr(virtiofs, "DAEMONS", ())
    monkeypatch.setenv("VMCTL_VIRTIOFSD", "/nonexistent/virtiofsd")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="virtiofsd is not installed"):
        virtiofs.check(USERNS, ("9p", "virtiofs"))


def test_daemon_runs_mapped_sandboxed_and_without_xattrs() -> None:
    argv = virtiofs.daemon_argv(Path("/usr/lib/qemu/virtiofsd"), USERNS, Path("/w/p"), 3)
    head = argv[: argv.index("--")]
    user = contract.raw()["user"]
    assert head == [
        "/usr/bin/unshare", "--user", f"--map-user={user['uid']}",
        f"--map-group={user['gid']}", "--keep-caps",
    ]  # fmt: skip
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert "source=/w/p" in opts and "sandbox=namespace" in opts and "no_xattr" in opts
    assert "--fd=3" in argv


def test_macos_keeps_9p_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU on macOS has no vhost-user: refused with the fix, as on any host without it."""
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(ConfigError, match="needs Linux") as e:
        virtiofs.check(USERNS, ("9p", "virtiofs"))
    assert "--share 9p" in (e.value.hint or "")


def test_commas_in_the_folder_are_escaped_for_the_daemon() -> None:
    """The daemon's `-o` list splits on commas: `/w/a,b` must stay one path."""
    argv = virtiofs.daemon_argv(Path("/usr/lib/qemu/virtiofsd"), USERNS, Path("/w/a,b\\c"), 3)
    assert "source=/w/a\\,b\\\\c" in argv
