"""SBPL rendering, checked structurally by parsing it as s-expressions.

Render-only: sandbox-exec cannot run on Linux; tests/test_sandbox_darwin.py
runs the same profiles for real on macOS.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmctl.errors import SandboxError
from vmctl.sandbox import launch as sandbox
from vmctl.sandbox import seatbelt
from vmctl.sandbox.resolve import SandboxContext

SExp = Union[str, "list[SExp]"]
TOKEN = re.compile(r'\s+|;[^\n]*|\(|\)|"(?:[^"\\]|\\.)*"|[^\s()";]+')


def parse(text: str) -> list[SExp]:
    """A tiny s-expression reader: lists, strings (kept quoted) and atoms."""
    stack: list[list[SExp]] = [[]]
    pos = 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        assert m, f"unreadable SBPL at {pos}: {text[pos : pos + 20]!r}"
        tok, pos = m.group(), m.end()
        if tok.isspace() or tok.startswith(";"):
            continue
        if tok == "(":
            stack.append([])
        elif tok == ")":
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(tok)
    assert len(stack) == 1, "unbalanced parentheses"
    return stack[0]


def walk(form: SExp) -> list[list[SExp]]:
    if isinstance(form, str):
        return []
    return [form] + [f for sub in form for f in walk(sub)]


def ctx_for(tmp_path: Path, workspace: Path | None = None) -> SandboxContext:
    return SandboxContext(
        binary=Path("/opt/llama/bin/llama-server"), cache=tmp_path / "run" / "cache",
        runtime=tmp_path / "run", model=(tmp_path / "m.gguf", tmp_path / "mmproj.gguf"),
        workspace=workspace or tmp_path / "ws", state=tmp_path / "state", endpoint_port=8080,
        endpoint_socket=tmp_path / "run" / "llama.sock",
    )  # fmt: skip


def render(profile: str, ctx: SandboxContext) -> tuple[list[SExp], dict[str, str], list[str]]:
    cmd = sandbox.sandboxed_command(profile, [str(ctx.binary)], ctx, platform="darwin")
    (text,) = cmd.files.values()
    params = {}
    argv = cmd.argv
    for i, a in enumerate(argv[: argv.index("--")]):
        if a == "-D":
            name, _, value = argv[i + 1].partition("=")
            params[name] = value
    return parse(text), params, argv


def check_structure(forms: list[SExp], params: dict[str, str]) -> None:
    assert forms[0] == ["version", "1"]
    assert forms[1] == ["deny", "default"]
    narrowing = (
        ["deny", "process-fork"],
        ["deny", "network-outbound", ["with", "send-signal", "SIGKILL"]],
    )
    for rule in forms[2:]:
        assert isinstance(rule, list)
        assert rule[0] == "allow" or rule in narrowing, rule
    referenced = {f[1].strip('"') for f in walk(forms) if f and f[0] == "param"}
    assert referenced == set(params), "every -D is used and every param passed"
    for f in walk(forms):  # paths only ever as params
        if f and f[0] in ("subpath", "literal", "path-literal", "regex", "prefix"):
            assert isinstance(f[1], list) and f[1][0] == "param", f
    for rule in forms:
        if isinstance(rule, list) and "network-outbound" in rule and rule[0] == "allow":
            assert not any(f and f[0] == "local" for f in walk(rule)), "(local ...) on outbound"
            for f in walk(rule):
                if f and f[0] == "remote" and f[1] == "tcp":
                    assert re.fullmatch(r"localhost:\d+", params[f[2][1].strip('"')])


@pytest.mark.parametrize("profile", ["llama-server", "llm", "opencode", "claude", "shell"])
def test_every_profile_is_default_deny_with_params(profile: str, tmp_path: Path) -> None:
    forms, params, argv = render(profile, ctx_for(tmp_path))
    check_structure(forms, params)
    assert argv[:2] == ["/usr/bin/sandbox-exec", "-f"]
    assert argv[argv.index("--") + 1 :] == ["/opt/llama/bin/llama-server"]


def test_llama_server_exact_paths_and_no_outbound(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    forms, params, _ = render("llama-server", ctx)
    text = str(forms)
    allowed_out = [
        r for r in forms if isinstance(r, list) and r[0] == "allow" and "network-outbound" in r
    ]
    assert not allowed_out
    assert ["deny", "network-outbound", ["with", "send-signal", "SIGKILL"]] in forms
    assert ["deny", "process-fork"] in forms and "process-fork" not in str(forms[:-2])
    values = set(params.values())
    for must in (ctx.binary, *ctx.model, ctx.runtime, "localhost:8080", ctx.endpoint_socket):
        assert str(must) in values
    assert str(ctx.cache) not in values  # inside the runtime folder: covered, not repeated
    assert str(ctx.workspace) not in values and str(ctx.state) not in values
    assert "IOGPUDeviceUserClient" in text and "MTLCompilerService" in text
    writes = [
        r for r in forms if isinstance(r, list) and r[:3] == ["allow", "file-read*", "file-write*"]
    ]
    written = {params[f[1].strip('"')] for r in writes for f in walk(r) if f and f[0] == "param"}
    assert written <= {str(ctx.runtime), "/dev/null"} | {v for v in values if "/folders/" in v}


def test_client_connects_to_endpoint_only(tmp_path: Path) -> None:
    forms, _params, _ = render("opencode", ctx_for(tmp_path))
    outs = [r for r in forms if isinstance(r, list) and r[:2] == ["allow", "network-outbound"]]
    assert len(outs) == 2  # the UNIX socket and localhost:PORT, nothing else
    assert not any(r for r in forms if isinstance(r, list) and "network-bind" in r)


HOSTILE = [
    'a")(allow default)',
    'x) (allow file-write* (subpath "/"))',
    'q"uote',
    "p(ar)en",
    "co,mma",
    "sp ace",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_paths_stay_in_parameters(tmp_path: Path, name: str) -> None:
    ws = tmp_path / name
    forms, params, argv = render("shell", ctx_for(tmp_path, ws))
    check_structure(forms, params)
    assert str(ws) in params.values()
    cmd = sandbox.sandboxed_command("shell", ["sh"], ctx_for(tmp_path, ws), platform="darwin")
    assert name not in next(iter(cmd.files.values()))
    assert f"P0={ctx_for(tmp_path, ws).binary}" in argv


@pytest.mark.parametrize("name", ["new\nline", "nul\x00", "cr\rx"])
def test_unsafe_paths_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(SandboxError):
        render("shell", ctx_for(tmp_path, tmp_path / name))


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=40).filter(lambda s: "/" not in s and s not in (".", "..")))
def test_property_any_name_is_refused_or_only_a_parameter(name: str) -> None:
    base = Path("/srv/vmctl-test")
    try:
        forms, params, _ = render("shell", ctx_for(base, base / name))
    except SandboxError:
        assert any(ord(c) < 32 or ord(c) == 127 for c in name)
        return
    check_structure(forms, params)
    assert str(base / name) in params.values()


def test_seatbelt_argv_shape() -> None:
    prof = seatbelt.SeatbeltProfile("(version 1)", {"P0": "/a b", "P1": '/x")'})
    argv = prof.argv(Path("/p.sb"), ["cmd", "-x"])
    assert argv == [
        "/usr/bin/sandbox-exec",
        "-f",
        "/p.sb",
        "-D",
        "P0=/a b",
        "-D",
        'P1=/x")',
        "--",
        "cmd",
        "-x",
    ]


def test_shipped_templates_have_no_literal_paths() -> None:
    text = (Path(seatbelt.__file__).parents[1] / "templates" / "profile.sb.j2").read_text()
    assert not re.search(r'\((subpath|literal|path-literal) "', text)
    assert "(local ip" not in text and "system.sb" not in text
