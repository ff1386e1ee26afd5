"""bwrap argv structure and ordering (pure rendering), plus the availability probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmctl.errors import SandboxError
from vmctl.sandbox import bwrap, policy
from vmctl.sandbox import launch as sandbox
from vmctl.sandbox.resolve import SandboxContext, resolve


@pytest.fixture
def server(tmp_path: Path) -> tuple[list[str], SandboxContext]:
    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    ctx = SandboxContext(binary=Path("/bin/true"), cache=run / "cache", runtime=run, model=(model,))
    res = resolve(policy.load("llama-server"), ctx, "linux")
    return bwrap.render(res, ["/bin/true", "--port", "x"], Path("/usr/bin/bwrap")), ctx


def pairs(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[: argv.index("--")]) if a == option]


def test_header_and_command(server: tuple[list[str], SandboxContext]) -> None:
    argv, _ = server
    assert argv[:4] == ["/usr/bin/bwrap", "--unshare-all", "--die-with-parent", "--new-session"]
    assert argv[4:12] == [
        "--cap-drop",
        "ALL",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
    ]
    sep = argv.index("--")
    assert argv[sep + 1 :] == [
        "/bin/true",
        "--port",
        "x",
    ]  # the command's own options stay after --
    assert "--share-net" not in argv and "--clearenv" not in argv  # env travels by exec, not argv
    assert argv[sep - 2 : sep] == ["--chdir", str(server[1].cache)]


def test_binds(server: tuple[list[str], SandboxContext]) -> None:
    argv, ctx = server
    rw = pairs(argv, "--bind")
    assert rw == [str(ctx.runtime)]  # the cache lies inside the socket folder: one writable bind
    ro = pairs(argv, "--ro-bind")
    assert str(ctx.model[0]) in ro and "/usr/lib/x86_64-linux-gnu" in ro
    assert not any(p in ro for p in ("/", "/etc", "/root", "/home", str(Path.home())))
    # each bind is SRC DEST with the same path, separate argv elements
    for i, a in enumerate(argv[: argv.index("--")]):
        if a in ("--bind", "--ro-bind"):
            assert argv[i + 1] == argv[i + 2]


def test_ordering(server: tuple[list[str], SandboxContext]) -> None:
    argv, _ctx = server
    head = argv[: argv.index("--")]
    tmpfs = head.index("/tmp")
    binds = [i for i, a in enumerate(head) if a in ("--bind", "--ro-bind")]
    assert all(i > tmpfs for i in binds), "--tmpfs /tmp must come before binds under /tmp"
    dests = [Path(head[i + 2]) for i in binds]
    for i, d in enumerate(dests):
        assert not any(d in later.parents for later in dests[:i]), "parents before children"
    links = [i for i, a in enumerate(head) if a == "--symlink"]
    remounts = [i for i, a in enumerate(head) if a == "--remount-ro"]
    assert max(binds + links) < min(remounts)
    assert pairs(argv, "--remount-ro") == ["/", "/tmp", "/dev"]  # llama-server has no scratch


def test_links_recreated(server: tuple[list[str], SandboxContext]) -> None:
    head = server[0][: server[0].index("--")]
    links = {head[i + 2]: head[i + 1] for i, a in enumerate(head) if a == "--symlink"}
    if Path("/lib64").is_symlink():
        assert "/lib64" in links


def test_client_profile_gets_private_tmp_and_socket(tmp_path: Path) -> None:
    ws, state, sock = tmp_path / "ws", tmp_path / "st", tmp_path / "gw" / "s.sock"
    for d in (ws, state, sock.parent):
        d.mkdir()
    sock.write_text("")  # stands in for the socket file
    ctx = SandboxContext(binary=Path("/bin/sh"), workspace=ws, state=state, endpoint_socket=sock)
    res = resolve(policy.load("shell"), ctx, "linux")
    argv = bwrap.render(res, ["sh"], Path("/usr/bin/bwrap"))
    assert pairs(argv, "--bind") == sorted([str(state), str(ws)])
    assert str(sock) in pairs(argv, "--ro-bind")
    assert pairs(argv, "--remount-ro") == ["/"]
    port_only = SandboxContext(binary=Path("/bin/sh"), workspace=ws, state=state, endpoint_port=80)
    res = resolve(policy.load("shell"), port_only, "linux")
    with pytest.raises(SandboxError, match="UNIX socket"):
        bwrap.render(res, ["sh"], Path("/usr/bin/bwrap"))


@pytest.mark.parametrize("bad", ["-rf", "--bind", "a\nb", "a\x00b"])
def test_option_like_or_control_paths_refused(bad: str) -> None:
    with pytest.raises(SandboxError):
        bwrap._arg(bad)


@pytest.mark.parametrize(
    ("stderr", "needle"),
    [
        ("bwrap: loopback: Failed RTM_NEWADDR: Operation not permitted", "AppArmor"),
        ("bwrap: Creating new namespace failed: Operation not permitted", "container"),
        ("bwrap: something else", "bwrap --unshare-all"),
    ],
)
def test_explain(stderr: str, needle: str) -> None:
    err = bwrap.explain(stderr)
    assert err.hint and needle in err.hint
    assert "\n" not in err.message


def test_probe_real(bwrap_bin: Path) -> None:
    assert bwrap.find_bwrap() == bwrap_bin.resolve()
    sandbox.check_available("linux")  # raises with a hint when namespaces are blocked


def test_unallowed_command_refused_before_launch(tmp_path: Path) -> None:
    ws, st = tmp_path / "ws", tmp_path / "st"
    ws.mkdir()
    st.mkdir()
    ctx = SandboxContext(binary=Path("/bin/sh"), workspace=ws, state=st)
    with pytest.raises(SandboxError, match="not an executable"):
        sandbox.sandboxed_command("shell", ["/usr/bin/apt-get", "install", "x"], ctx)


def test_cli_show_and_exec(
    workspace: Path, bwrap_bin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vmctl sandbox show` renders both platforms; `exec` propagates the exit status."""
    import json

    from vmctl.cli import main

    main(["sandbox", "show", "llama-server", "--platform", "darwin", "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["profile"].startswith(";;") and "(deny default)" in shown["profile"]
    assert shown["argv"][0] == "/usr/bin/sandbox-exec"
    with pytest.raises(SystemExit) as done:
        main(
            [
                "sandbox",
                "exec",
                "shell",
                "-w",
                str(workspace),
                "--",
                "sh",
                "-c",
                "echo hi > f; exit 3",
            ]
        )
    assert done.value.code == 3
    assert (workspace / "f").read_text() == "hi\n"
