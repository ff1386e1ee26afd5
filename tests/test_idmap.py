"""How the host user becomes the guest's agent: the choice and its command line.

The real guests are in test_workspace.py; these pin the decision (user
namespace, the Lima-style fallback, or one line with the fix) and where it
lands in QEMU's argv.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from vmctl.errors import ConfigError, VMError
from vmctl.paths import InstancePaths
from vmctl.vm import idmap
from vmctl.vm.accel import Accel
from vmctl.vm.qemu import qemu_argv
from vmctl.vm.spec import InstanceSpec


class Manifest:
    kernel = Path("/img/vmlinux")
    initrd = Path("/img/initrd.cpio")
    cmdline = "console=ttyS0"
    shares = ()


def argv(ids: idmap.IdMap) -> list[str]:
    spec = InstanceSpec(name="t1", workspace=Path("/home/u/proj"))
    tcg = Accel("tcg", "max", "q35", "x86_64")
    return qemu_argv(spec, Manifest(), InstancePaths(Path("/st/t1")), tcg, ids=ids, console_fd=7)


def test_userns_prefix_execs_qemu_in_place() -> None:
    prefix = idmap.userns_argv("/usr/bin/unshare", 1000, 1000)
    out = argv(idmap.IdMap("userns", 0, 0, tuple(prefix)))
    assert out[: len(prefix) + 1] == [
        "/usr/bin/unshare", "--user", "--map-user=1000", "--map-group=1000", "--",
        "qemu-system-x86_64",
    ]  # fmt: skip
    append = out[out.index("-append") + 1]
    assert append == "console=ttyS0 vmctl.instance=t1 vmctl.net=none vmctl.workspace=9p"


def test_guest_ids_go_on_the_kernel_command_line() -> None:
    out = argv(idmap.IdMap("guest", 501, 20))
    assert out[0] == "qemu-system-x86_64"
    assert out[out.index("-append") + 1].endswith("vmctl.workspace=9p vmctl.uid=501 vmctl.gid=20")


@pytest.fixture
def no_userns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(idmap.shutil, "which", lambda name: "/usr/bin/unshare")
    monkeypatch.setattr(
        idmap, "probe_userns", lambda *a: "unshare: write failed /proc/self/uid_map"
    )


def as_user(monkeypatch: pytest.MonkeyPatch, uid: int, gid: int) -> None:
    monkeypatch.setattr(idmap.os, "geteuid", lambda: uid)
    monkeypatch.setattr(idmap.os, "getegid", lambda: gid)


@pytest.mark.usefixtures("no_userns")
def test_root_without_user_namespaces_is_one_line_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    as_user(monkeypatch, 0, 0)
    with pytest.raises(VMError) as e:
        idmap.choose()
    assert "cannot take your ids (uid 0, gid 0)" in e.value.message
    assert "uid_map" in e.value.message
    assert e.value.hint and "ordinary user" in e.value.hint and "sysctl" in e.value.hint


def test_root_without_unshare_is_told_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(idmap.shutil, "which", lambda name: None)
    as_user(monkeypatch, 0, 0)
    with pytest.raises(VMError, match="`unshare` is not installed") as e:
        idmap.choose()
    assert e.value.hint == "install util-linux, or run vmctl as an ordinary user"


@pytest.mark.usefixtures("no_userns")
def test_a_user_without_user_namespaces_falls_back_out_loud(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    as_user(monkeypatch, 501, 20)
    ids = idmap.choose()
    assert (ids.how, ids.host_uid, ids.host_gid, ids.prefix) == ("guest", 501, 20, ())
    assert "uid_map" in ids.note and "takes your uid 501" in ids.note
    with pytest.raises(VMError, match="VMCTL_IDMAP=userns"):
        idmap.choose("userns")


def test_macos_takes_the_host_ids_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    as_user(monkeypatch, 501, 20)
    ids = idmap.choose()
    assert (ids.how, ids.note, ids.cmdline()) == ("guest", "", "vmctl.uid=501 vmctl.gid=20")


def test_bad_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMCTL_IDMAP", "passthrough")
    with pytest.raises(ConfigError, match="VMCTL_IDMAP='passthrough'"):
        idmap.choose()


def test_probe_reports_a_broken_unshare(tmp_path: Path) -> None:
    fake = tmp_path / "unshare"
    fake.write_text(
        "#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2; exit 1\n"
    )
    fake.chmod(0o755)
    assert idmap.probe_userns(str(fake), 1000, 1000) == (
        "unshare: unshare failed: Operation not permitted"
    )
    assert "No such file" in str(idmap.probe_userns(str(tmp_path / "missing"), 1000, 1000))


def test_probe_succeeds_here() -> None:
    unshare = shutil.which("unshare")
    if not sys.platform.startswith("linux") or unshare is None:
        pytest.skip("needs Linux and util-linux unshare")
    assert idmap.probe_userns(unshare, 1000, 1000) is None


def test_privileged_forward_is_refused_in_a_user_namespace() -> None:
    ids = idmap.IdMap("userns", 0, 0, ("unshare",))
    with pytest.raises(ConfigError, match=r"-p 80:\.\.\.: QEMU runs without privileges"):
        idmap.check_forwards(ids, [8080, 80])
    idmap.check_forwards(ids, [8080])
    idmap.check_forwards(idmap.IdMap("guest", 501, 20), [80])  # QEMU says why itself


def test_both_images_read_the_agent_ids_from_the_contract() -> None:
    from vmctl import contract
    from vmctl.images import micro

    keys = contract.raw()["kernel_cmdline"]
    init = micro.render_init(["kernel/fs/9p/9p.ko"], ())
    assert f"{keys['uid']}=*) auid=" in init and f"{keys['gid']}=*) agid=" in init
    assert 'chown "$auid:$agid" /run/vmctl' in init
    assert "access=user" in contract.transports()["9p"].options
    nix = (Path(__file__).parent.parent / "nixos-modules/guest.nix").read_text()
    assert "${cmdline.uid}=*) uid=" in nix and "${cmdline.gid}=*) gid=" in nix
