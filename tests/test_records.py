"""State files are typed records parsed strictly; status comes from them, never a default.

Fast: no guest and no llama-server. A record is written the way vmctl
writes it, and the real CLI reads it back.
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
from vmctl import paths
from vmctl.procs import ProcessRef
from vmctl.serve.record import ServerRecord
from vmctl.state import StateError
from vmctl.vm.spec import InstanceRecord, InstanceSpec


def _record(name: str, qemu: ProcessRef | None, ws: Path) -> InstanceRecord:
    spec = InstanceSpec(name=name, workspace=ws, net="none", mem="1G", cpus=1)
    rec = InstanceRecord.of(spec, "micro", time.time(), ProcessRef.of(os.getpid()))
    return InstanceRecord(**{**rec.__dict__, "owner": None, "qemu": qemu})


def _ls(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        vmctl_cmd("ls", *args), capture_output=True, text=True, timeout=120, check=True
    )


@pytest.fixture
def sleeper() -> Iterator[ProcessRef]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield ProcessRef.of(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_instance_record_round_trips(tmp_path: Path, sleeper: ProcessRef) -> None:
    rec = _record("box", sleeper, tmp_path)
    rec.write(tmp_path / "instance.json")
    assert InstanceRecord.read(tmp_path / "instance.json") == rec


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["spec"].update(cpus="2"),
        lambda d: d["spec"].update(ephemeral=1),
        lambda d: d["spec"].update(forwards=[[1, "2"]]),
        lambda d: d.update(qemu={"pid": "12"}),
        lambda d: d.pop("spec"),
    ],
)
def test_instance_record_is_parsed_strictly(tmp_path: Path, change: object) -> None:
    data = _record("box", None, tmp_path).to_json()
    change(data)  # type: ignore[operator]
    (tmp_path / "instance.json").write_text(json.dumps(data))
    with pytest.raises(StateError):
        InstanceRecord.read(tmp_path / "instance.json")


def test_stopped_guest_is_stopped_in_ls_all(tmp_path: Path, sleeper: ProcessRef) -> None:
    """After `vmctl down` a persistent guest's record has a dead QEMU: `ls -a` says stopped."""
    for name, qemu in (("gone", ProcessRef(sleeper.pid, "not-its-start")), ("live", sleeper)):
        ip = paths.instance(name)
        paths.private_dir(ip.root)
        _record(name, qemu, tmp_path).write(ip.meta)
    everything = json.loads(_ls("--all", "--json").stdout)["instances"]
    assert {i["name"]: i["state"] for i in everything} == {"gone": "stopped", "live": "running"}
    table = _ls("--all").stdout
    assert any(ln.split()[:3] == ["vm", "gone", "stopped"] for ln in table.splitlines()), table
    running = json.loads(_ls("--json").stdout)["instances"]
    assert [i["name"] for i in running] == ["live"]


def test_server_record_round_trips_and_is_strict(tmp_path: Path, sleeper: ProcessRef) -> None:
    rec = ServerRecord(
        name="serve-1", alias="m", host="127.0.0.1", port=1, api_key=None, sandbox=True,
        model="/m.gguf", supervisor=sleeper, llama=None, started=1.0, state="ready",
    )  # fmt: skip
    path = tmp_path / "server.json"
    rec.write(path)
    assert ServerRecord.read(path) == rec
    assert json.loads(path.read_text())["url"] == "http://127.0.0.1:1"
    for bad in ({"port": "1"}, {"state": "running"}, {"sandbox": "yes"}, {"api_key": 3}):
        path.write_text(json.dumps({**rec.to_json(), **bad}))
        with pytest.raises(StateError):
            ServerRecord.read(path)
