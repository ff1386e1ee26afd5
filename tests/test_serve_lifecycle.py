"""`vmctl serve --detach`, `status`, `stop`, `rm` around a stand-in llama-server (seconds).

tests/fakes/llama_server.py answers `/health` on the UNIX socket the way
llama-server does (503 while loading, then 200), so the supervisor's real
wait, its server.json record and the shared verbs run without a model
being loaded. test_serve.py covers the real llama-server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, vmctl_cmd
from test_gguf_check import make_gguf
from vmctl import paths
from vmctl.serve.record import ServerRecord

FAKE = Path(__file__).parent / "fakes" / "llama_server.py"


def fake_llama(tmp_path: Path, env: str = "") -> Path:
    """An executable `llama-server` that runs the stand-in (llama-server's env is cleaned)."""
    script = tmp_path / "llama-server"
    script.write_text(f'#!/bin/sh\n{env} exec {sys.executable} {FAKE} "$@"\n')
    script.chmod(0o755)
    return script


def vmctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        vmctl_cmd(*args), capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "VMCTL_QUIET": "1"},
    )  # fmt: skip


def test_detached_server_lifecycle(tmp_path: Path) -> None:
    binary = fake_llama(tmp_path, "FAKE_LLAMA_LOAD_S=1.5")
    model = make_gguf(tmp_path / "tiny.gguf")  # a real GGUF: its header check takes no time
    port = free_port()
    up = vmctl("serve", str(model), "--detach", "--json", "--no-sandbox",
               "--llama-server", str(binary), "--port", str(port), "--name", "fake")  # fmt: skip
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout.splitlines()[-1])["base_url"] == f"http://127.0.0.1:{port}/v1"
    record = ServerRecord.read(paths.server("fake").meta)
    assert record.state == "ready" and record.llama is not None and record.llama.alive()
    status = json.loads(vmctl("status", "fake", "--json").stdout)
    assert (status["kind"], status["state"], status["port"]) == ("server", "running", port)
    assert [s["name"] for s in json.loads(vmctl("ls", "--json").stdout)["servers"]] == ["fake"]
    assert vmctl("stop", "fake").returncode == 0
    record = ServerRecord.read(paths.server("fake").meta)
    assert record.state == "stopped" and not record.supervisor.alive()
    assert record.llama is not None and not record.llama.alive()
    assert not paths.server("fake").runtime.exists()
    assert json.loads(vmctl("status", "fake", "--json").stdout)["state"] == "stopped"
    assert vmctl("rm", "fake").returncode == 0 and not paths.server("fake").root.exists()


@pytest.mark.parametrize("detach", [True, False])
def test_llama_server_dying_while_loading_is_one_error(tmp_path: Path, detach: bool) -> None:
    binary = fake_llama(tmp_path, "FAKE_LLAMA_DIE=1")
    model = str(make_gguf(tmp_path / "tiny.gguf"))
    args = [
        "serve",
        model,
        "--no-sandbox",
        "--llama-server",
        str(binary),
        "--port",
        str(free_port()),
    ]
    out = vmctl(*args, *(["--detach"] if detach else []))
    assert out.returncode != 0
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert errors and "exited while loading" in errors[0], out.stderr
    assert "cannot load the model" in out.stderr  # llama-server's own last line
    assert "Traceback" not in out.stderr
