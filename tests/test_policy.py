"""The policy model: strict loading, lookup, placeholder resolution, env, workspace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmctl import paths
from vmctl.errors import ConfigError, SandboxError
from vmctl.sandbox import launch as sandbox
from vmctl.sandbox import policy
from vmctl.sandbox.resolve import SandboxContext, resolve

SHIPPED = {"llama-server", "llm", "opencode", "claude", "shell"}


def write_profile(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def full_ctx(tmp_path: Path) -> SandboxContext:
    folders = {n: tmp_path / n for n in ("cache", "run", "ws", "state")}
    for f in folders.values():
        f.mkdir(exist_ok=True)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    return SandboxContext(
        binary=Path("/bin/sh"), cache=folders["cache"], runtime=folders["run"], model=(model,),
        workspace=folders["ws"], state=folders["state"], endpoint_port=8080,
        endpoint_socket=folders["run"] / "llama.sock",
    )  # fmt: skip


def test_shipped_profiles_load_and_render_for_both_platforms(tmp_path: Path) -> None:
    assert set(policy.list_profiles()) >= SHIPPED
    for name in SHIPPED:
        pol = policy.load(name)
        assert pol.description and pol.network in policy.NETWORK_MODES
        for plat in policy.PLATFORMS:
            res = resolve(pol, full_ctx(tmp_path), plat, strict=False)
            assert res.read or res.write
    assert policy.load("llama-server").network == "bind"
    assert policy.load("llama-server").kill_on_outbound and not policy.load("llama-server").fork
    assert {policy.load(n).network for n in SHIPPED - {"llama-server"}} == {"connect"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('reed = ["/x"]\n', "'reed'"),
        ('[linux]\nread = ["/x"]\nbogus = 1\n', "'bogus' in linux"),
        ('[darwin]\nsurprise = ["/x"]\n', "'surprise' in darwin"),
        ('[linux]\niokit = ["X"]\n', "'iokit' in linux"),
        ('[network]\nmode = "everything"\n', "network.mode"),
        ('[network]\nmode = "none"\nhost = "x"\n', "host"),
        ('read = ["{secrets}"]\n', "{secrets}"),
        ('read = ["relative/path"]\n', "absolute"),
        ('env = ["AWS_SECRET_ACCESS_KEY"]\n', "credential"),
        ('env = ["GITHUB_TOKEN"]\n', "credential"),
        ('read = "/x"\n', "list of strings"),
        ("read = [\n", "invalid TOML"),
    ],
)
def test_loader_is_strict(tmp_path: Path, text: str, needle: str) -> None:
    path = write_profile(tmp_path, "bad", text)
    with pytest.raises(ConfigError) as e:
        policy.load_file(path)
    assert needle in e.value.message and str(path) in e.value.message
    assert "\n" not in e.value.message


def test_lookup_order_env_dir_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = write_profile(tmp_path / "mine", "shell", 'description = "mine"\n')
    write_profile(tmp_path / "mine", "extra", 'description = "x"\n')
    monkeypatch.setenv("VMCTL_PROFILES_DIR", str(tmp_path / "mine"))
    assert policy.find("shell") == own
    assert policy.load("shell").description == "mine"
    assert {"extra", "llama-server"} <= set(policy.list_profiles())
    with pytest.raises(ConfigError, match="invalid profile name"):
        policy.find("../etc/passwd")
    with pytest.raises(ConfigError, match="no sandbox profile"):
        policy.find("nope")


def test_resolution_canonicalises_symlinks(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    ctx = full_ctx(tmp_path)
    ctx = SandboxContext(**{**ctx.__dict__, "workspace": tmp_path / "alias"})
    res = resolve(policy.load("shell"), ctx, "linux")
    assert real in res.write and tmp_path / "alias" not in res.write
    assert any(link.path == tmp_path / "alias" for link in res.links)
    assert res.setenv["HOME"] == str(ctx.state)
    assert res.cwd == real


@pytest.mark.parametrize("bad", ["a\nb", "a\x00b", "a\rb", "tab\there"])
def test_control_characters_refused(tmp_path: Path, bad: str) -> None:
    ctx = SandboxContext(**{**full_ctx(tmp_path).__dict__, "workspace": tmp_path / bad})
    with pytest.raises(SandboxError, match="control character") as e:
        resolve(policy.load("shell"), ctx, "linux", strict=False)
    assert "\n" not in e.value.message.replace(repr(bad), "")


def test_missing_placeholder_and_missing_path(tmp_path: Path) -> None:
    ctx = SandboxContext(binary=Path("/bin/sh"))
    with pytest.raises(SandboxError, match=r"needs \{workspace\}"):
        resolve(policy.load("shell"), ctx, "linux")
    ctx = SandboxContext(**{**full_ctx(tmp_path).__dict__, "model": (tmp_path / "gone.gguf",)})
    with pytest.raises(SandboxError, match="does not exist"):
        resolve(policy.load("llama-server"), ctx, "linux")


def test_placeholders_used() -> None:
    assert {"binary", "model", "cache", "runtime"} <= policy.load("llama-server").placeholders(
        "linux"
    )
    assert "darwin_user_temp" in policy.load("llama-server").placeholders("darwin")
    assert {"workspace", "state"} <= policy.load("opencode").placeholders("linux")


def test_clean_env_is_an_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary")
    monkeypatch.setenv("HF_TOKEN", "canary")
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = sandbox.clean_env(["LANG", "HF_TOKEN", "UNSET_VAR"], {"HOME": "/s"})
    assert env == {"LANG": "C.UTF-8", "HOME": "/s"}
    cmd = sandbox.unsandboxed_command(["true"], {"X": "1"}, "shell")
    assert "canary" not in cmd.env.values() and cmd.env["X"] == "1" and not cmd.files


def test_check_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = tmp_path / "proj"
    ws.mkdir()
    (tmp_path / "link").symlink_to(ws)
    assert sandbox.check_workspace(tmp_path / "link") == ws
    with pytest.raises(ConfigError, match="does not exist"):
        sandbox.check_workspace(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a folder"):
        sandbox.check_workspace(tmp_path / "file")
    monkeypatch.setenv("HOME", str(tmp_path))
    state = paths.home()
    for bad in (Path("/"), tmp_path, state, state.parent):
        with pytest.raises(ConfigError, match="refusing workspace"):
            sandbox.check_workspace(bad)
    assert os.path.realpath(state) != str(ws)
