"""The main job, proven: real agents change the user's files, with their tools on.

A scripted stand-in model (tests/fakes/scripted_model.py) answers each
agent with a fixed sequence of tool calls: read notes.txt, edit it, write a
new file in a new folder, run a shell command, then a final message. It
stands in for a model because a 135M-parameter model cannot drive tools
reliably; what is tested is vmctl and the agents' plumbing: the injected
configuration, tools on, the model-only network, the workspace share and
the audit. Each test asserts that the host's files changed exactly as
scripted and that every request the stand-in answered is in vmctl's audit.

Guest: one boot carries opencode, Claude Code, Codex and llm (few boots:
each agent turn under TCG takes minutes), its workspace over virtio-fs
(`--share virtiofs`; the default 9p carries tests/test_e2e.py's guest and
tests/test_workspace.py's). Host: the agents under `vmctl run`.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need, vmctl_cmd
from fakes.scripted_model import FINAL_TEXT, TITLE_TEXT, Script, ScriptedModel
from vmctl import agents, events, paths
from vmctl.clients import registry as clients
from vmctl.vm import virtiofs

GUEST_AGENTS = ("opencode", "claude", "codex", "llm")
PROMPT = "Do the job in notes.txt."
#: How each agent is asked, inside the guest and under `vmctl run`.
ARGS = {
    "opencode": ["run", PROMPT],
    "claude": ["-p", PROMPT],
    "codex": ["exec", "--skip-git-repo-check", PROMPT],
}
#: The tools each agent is scripted to call, in order (Codex has only a shell).
CALLS = {
    "opencode": ["read", "edit", "write", "bash"],
    "claude": ["Read", "Edit", "Write", "Bash"],
    "codex": ["exec_command"],
}


@pytest.fixture
def model() -> Iterator[ScriptedModel]:
    with ScriptedModel() as m:
        yield m


def files_of(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def assert_job_done(folder: Path, script: Script, model: ScriptedModel, what: str) -> None:
    """Exactly the scripted files, with exactly the scripted contents."""
    assert files_of(folder) == script.expected(), (what, model.tool_results())


def answered(model: ScriptedModel, since: int) -> list[str]:
    """`METHOD PATH` of each model request the stand-in answered since `since`."""
    return [f"{r.method} {_path(r.path)}" for r in model.requests[since:] if r.method == "POST"]


def _path(path: str) -> str:
    return path.split("?", 1)[0]


def seed_for_guest(folder: Path, script: Script) -> None:
    folder.mkdir()
    script.seed(folder)


def _guest_run(name: str, cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        vmctl_cmd("exec", name, "--", "sh", "-c", cmd),
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.qemu
@pytest.mark.timeout(3000)
def test_agents_in_a_guest_edit_the_workspace(
    model: ScriptedModel, qemu_bin: Path, tmp_path: Path, vmctl_home: Path
) -> None:
    need(virtiofs.find_daemon() is not None, "virtiofsd (qemu-system-common)")
    ws = tmp_path / "ws"
    ws.mkdir()
    name = "agents"
    up = subprocess.run(
        vmctl_cmd(
            "up", "-d", str(ws), "--ephemeral", "--detach", "--name", name, "--image", "micro",
            *[x for a in GUEST_AGENTS for x in ("--with", a)], "--net", "model",
            "--share", "virtiofs",
            "--model-endpoint", f"127.0.0.1:{model.port}", "--json",
            "--accel", "tcg",  # KVM's probe can pass where a real boot then hangs
        ),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    assert "without tools" not in up.stderr  # 64k of context: tools on, no notice
    # The guest's sidecar writes one `request` event per request to a plain endpoint.
    audit = vmctl_home / "events" / f"guest-{name}.jsonl"
    try:
        for agent in ("opencode", "claude", "codex"):
            script = Script(root=f"/workspace/{agent}")
            model.script = script
            seed_for_guest(ws / agent, script)
            since = len(model.requests)
            audited = len(audit.read_text().splitlines()) if audit.exists() else 0
            cmd = f"cd /workspace/{agent} && {agent} {' '.join(map(repr, ARGS[agent]))}"
            run = _guest_run(name, cmd, timeout=1200)
            if agent == "claude" and files_of(ws / agent) != script.expected():
                # Claude Code 2.1.197 now and then (about 1 run in 20 here, under
                # TCG) runs its Bash step before the folder its Write step made is
                # there: "made/by-agent/answer.txt: No such file or directory",
                # while a shell's mkdir then another process's write never failed
                # in 300 tries in the same guest. Its own race, not the share's:
                # said, and the job asked once more (the script replays every step).
                said = f"claude: job not done, asked again: {model.tool_results()}"
                warnings.warn(said, stacklevel=1)
                run = _guest_run(name, cmd, timeout=1200)
            assert run.returncode == 0, f"{agent}: {run.stdout}\n{run.stderr}"
            assert FINAL_TEXT in run.stdout, run.stdout
            assert_job_done(ws / agent, script, model, agent)
            asked = answered(model, since)
            assert model.tool_calls()[-len(CALLS[agent]) :] == CALLS[agent]
            # Every request the model answered went through the guest's sidecar, audited.
            lines = [json.loads(x) for x in audit.read_text().splitlines()[audited:]]
            relayed = [f"{x['method']} {_path(x['path'])}" for x in lines if x["kind"] == "request"]
            assert not Counter(asked) - Counter(relayed), (asked, relayed)
            assert all(x["who"] == name for x in lines)
        since = len(model.requests)
        run = _guest_run(name, "cd /workspace && llm 'Say hello'", timeout=900)
        assert (run.returncode, run.stdout.strip()) == (0, TITLE_TEXT), run.stderr
        assert answered(model, since) == ["POST /v1/chat/completions"]
    finally:
        subprocess.run(vmctl_cmd("down", name), timeout=120, check=False)
    assert not (vmctl_home / "instances" / name).exists()


@pytest.mark.parametrize("agent", ["opencode", "claude", "codex"])
def test_agents_under_vmctl_run_edit_the_workspace(
    agent: str, model: ScriptedModel, bwrap_bin: Path, tmp_path: Path
) -> None:
    try:
        clients.get(agent).find(None)
    except Exception as e:
        need(False, f"{agent} is not installed (scripts/install-agents.sh): {e}")
    ws = tmp_path / "ws"
    ws.mkdir()
    model.script = script = Script(root=str(ws))
    script.seed(ws)
    run = subprocess.run(
        vmctl_cmd("run", agent, "-w", str(ws), "--endpoint", model.url, "--", *ARGS[agent]),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert FINAL_TEXT in run.stdout
    assert "without tools" not in run.stderr
    assert_job_done(ws, script, model, agent)
    # Every model request went through the bridge and is in the client's events.
    audit = list(events.read_file(events.subject_file(paths.events_dir(), "client", agent)))
    relayed = [f"{e.method} {_path(str(e.path))}" for e in audit if e.kind == "request"]
    assert audit[-1].kind == "connection" and audit[-1].who == agent
    asked = answered(model, 0)
    assert len(asked) >= len(CALLS[agent]) + 1, asked  # each call, then the final answer
    assert not Counter(asked) - Counter(relayed), (asked, relayed)


def test_a_small_context_is_said_once_at_vmctl_run_with_the_fix(
    bwrap_bin: Path, tmp_path: Path
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    with ScriptedModel(context=8192) as small:
        run = subprocess.run(
            vmctl_cmd("run", "opencode", "-w", str(ws), "--endpoint", small.url,
                      "--client-bin", "/bin/true"),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "without tools" in line]
    assert len(lines) == 1 and "8192" in lines[0] and "vmctl serve" in lines[0], run.stderr
    config = paths.client("opencode") / "state/config/opencode/opencode.json"
    assert json.loads(config.read_text())["agent"]["build"]["tools"] == {"*": False}


def test_status_shows_what_up_warned_about(tmp_path: Path) -> None:
    from vmctl.vm import boot
    from vmctl.vm.spec import InstanceSpec

    notice = agents.context_notice(agents.AgentEndpoint(agents.GUEST_BASE_URL, ("m",), None, 8192))
    assert notice is not None
    boot.new_instance(InstanceSpec(name="said", workspace=tmp_path), "micro", [notice])
    text = subprocess.run(vmctl_cmd("status", "said"), capture_output=True, text=True, timeout=60)
    assert f"notice          {notice}" in text.stdout.splitlines(), text.stdout + text.stderr
    data = subprocess.run(
        vmctl_cmd("status", "said", "--json"), capture_output=True, text=True, timeout=60
    )
    assert json.loads(data.stdout)["notices"] == [notice]
