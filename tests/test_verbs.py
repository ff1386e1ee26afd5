"""One verb set: `stop`, `status`, `rm` for servers and guests alike, hints for the rest.

Fast: a guest is a `FakeGuest` (a stand-in QEMU with a fake QMP monitor)
and a server is its record with a stand-in supervisor; the real `vmctl`
command line drives both.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import vmctl_cmd
from fakes.guest import FakeGuest
from vmctl import paths, ui
from vmctl.images import choose
from vmctl.procs import ProcessRef
from vmctl.serve.record import ServerRecord


def vmctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        vmctl_cmd(*args), capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[FakeGuest]:
    g = FakeGuest("box", tmp_path)
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def served() -> Iterator[subprocess.Popen[bytes]]:
    """A server record whose supervisor is a stand-in process (SIGTERM ends it)."""
    proc = subprocess.Popen(["sleep", "300"])
    sp = paths.server("serve-1")
    paths.private_dir(sp.root)
    ServerRecord(
        name="serve-1", alias="m", host="127.0.0.1", port=1, api_key=None, sandbox=True,
        model="/m.gguf", supervisor=ProcessRef.of(proc.pid), llama=None, started=time.time(),
        state="ready",
    ).write(sp.meta)  # fmt: skip
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_stop_status_rm_a_guest(guest: FakeGuest) -> None:
    status = json.loads(vmctl("status", "box", "--json").stdout)
    assert (status["kind"], status["state"]) == ("guest", "running")
    out = vmctl("stop", "box")
    assert out.returncode == 0, out.stderr
    assert guest.qmp.commands[-1] == "system_powerdown"  # the ladder's first rung did it
    assert guest.reap() is not None
    assert json.loads(vmctl("status", "box", "--json").stdout)["state"] == "stopped"
    assert vmctl("rm", "box").returncode == 0
    assert not guest.paths.root.exists()


def test_stop_status_rm_a_server(served: subprocess.Popen[bytes]) -> None:
    status = json.loads(vmctl("status", "serve-1", "--json").stdout)
    assert (status["kind"], status["state"], status["pid"]) == ("server", "running", served.pid)
    out = vmctl("rm", "serve-1")
    assert out.returncode != 0 and "vmctl stop serve-1" in out.stderr
    assert vmctl("stop", "serve-1").returncode == 0
    assert served.wait(10) is not None
    assert vmctl("rm", "serve-1").returncode == 0
    assert not paths.server("serve-1").root.exists()


def test_wrong_kind_names_the_verb_that_fits(served: subprocess.Popen[bytes]) -> None:
    for verb, extra in (("down", ()), ("exec", ("--", "true")), ("console", ())):
        out = vmctl(verb, "serve-1", *extra)
        assert out.returncode != 0
        assert out.stderr.startswith("error: serve-1 is a server"), out.stderr
        assert "Traceback" not in out.stderr
    assert "hint: vmctl stop serve-1" in vmctl("down", "serve-1").stderr
    assert served.poll() is None  # nothing was stopped


def test_nothing_by_that_name() -> None:
    for verb in ("stop", "status", "rm"):
        out = vmctl(verb, "nobody")
        assert out.returncode != 0 and "nothing named 'nobody'" in out.stderr, out.stderr


def test_serve_dash_d_is_not_detach() -> None:
    out = vmctl("serve", "-d", env={"VMCTL_LLAMA_SERVER": "/nonexistent"})
    assert out.returncode != 0
    assert "vmctl up -d DIR" in out.stderr and "hint: use --detach" in out.stderr


def test_shell_completion_knows_the_verbs() -> None:
    env = {"_VMCTL_COMPLETE": "complete_bash", "COMP_WORDS": "vmctl st", "COMP_CWORD": "1"}
    out = vmctl(env=env)
    assert out.stdout.split() == ["stop", "status"], out.stderr
    assert "--install-completion" in vmctl("--help").stdout


def test_missing_nix_is_one_line_under_verbose(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    why = "nix cannot evaluate . offline: cannot fetch nixpkgs"
    monkeypatch.setattr(choose.nixos, "nix_probe", lambda flake=None: why)
    monkeypatch.setattr(choose, "resolve_image", lambda image, *a, **k: image)
    monkeypatch.delenv("VMCTL_QUIET", raising=False)
    monkeypatch.setattr(ui, "_forced_quiet", False)  # an earlier `--json` test may have set it
    for verbose in (False, True):
        ui.verbose(verbose)
        try:
            assert choose.choose_image("auto")[1] == "micro"
        finally:
            ui.verbose(False)
        err = capsys.readouterr().err
        assert "image: micro" in err
        assert (why in err) is verbose
        assert "error" not in err.lower()


def test_each_verb_is_found_in_the_module_that_registers_it() -> None:
    import importlib

    from vmctl import cli

    registered = {}
    for name in dict.fromkeys(cli.VERBS.values()):
        for command in importlib.import_module(f"vmctl.cli.{name}").verbs.registered_commands:
            assert command.callback is not None
            registered[command.name or command.callback.__name__.replace("_", "-")] = name
    assert registered == cli.VERBS
    assert all(importlib.import_module(f"vmctl.cli.{g}").group for g in cli.GROUPS)
    assert cli._verb(["-v", "up", "-d", "x"]) == "up" and cli._verb(["--help"]) is None
