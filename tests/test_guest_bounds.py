"""A real guest against a real `vmctl serve` gateway: attributed, escaped, bounded.

The model server is `vmctl serve --no-sandbox` with a stand-in llama-server
(tests/standin_llama.py): the gateway, the supervisor, the routes and the
events are vmctl's own; only the model is faked. The guest is the micro
image under TCG with `--net model`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port, need
from guests import VMCTL, vmctl
from vmctl import events, paths
from vmctl.images import choose
from vmctl.procs import ProcessRef
from vmctl.sidecars import guestlaunch

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
HELD = 300
KEY = "sekrit-key"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def ours(marker: str) -> int:
    """Processes whose command line names `marker` (this guest's forwarder, sidecar)."""
    n = 0
    for d in os.listdir("/proc"):
        try:
            n += marker in Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
    return n


def nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    need(bool(subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).stdout), "qemu")
    home = tmp_path_factory.mktemp("bounds")
    cache = os.environ.get("VMCTL_CACHE") or str(Path.home() / ".local/state/vmctl/cache")
    standin = home / "llama-standin"
    script = Path(__file__).with_name("standin_llama.py")
    standin.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    standin.chmod(0o755)
    e = {**os.environ, "VMCTL_HOME": str(home), "VMCTL_CACHE": cache, "VMCTL_QUIET": "1"}
    os.environ["VMCTL_CACHE"] = cache
    e["TEST_MANIFEST"] = str(choose.resolve_image("micro").path)
    port = free_port()
    e["TEST_PORT"] = str(port)
    r = vmctl(e, "serve", "--detach", "--no-sandbox", "--llama-server", str(standin),
              "--port", str(port), "--name", "s1", "--api-key", KEY, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        yield e
    finally:
        for root in (home / "instances").glob("*"):
            vmctl(e, "down", root.name, timeout=60)
        vmctl(e, "stop", "s1", timeout=60)


@pytest.fixture(scope="module")
def box(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ws = tmp_path_factory.mktemp("ws")
    r = vmctl(env, "up", "-d", str(ws), "--name", "box", "--image", env["TEST_MANIFEST"],
              "--accel", "tcg", "--detach", "--timeout", "240", timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    yield "box"
    vmctl(env, "down", "box", timeout=60)


def box_events(env: dict[str, str]) -> list[events.Event]:
    return list(events.read_file(Path(env["VMCTL_HOME"]) / "events" / "guest-box.jsonl"))


def meta(env: dict[str, str], name: str) -> dict[str, dict[str, object]]:
    path = Path(env["VMCTL_HOME"]) / "instances" / name / "instance.json"
    data: dict[str, dict[str, object]] = json.loads(path.read_text())
    return data


def test_guest_request_is_attributed_and_its_control_bytes_escaped(
    env: dict[str, str], box: str
) -> None:
    script = (
        "wget -q -O - --header 'X-Vmctl-Who: host' http://10.0.2.2:8080/v1/models; echo; "
        r"(printf 'GET /\033]2;pwned\007\033[2J HTTP/1.1\r\nHost: x\r\n\r\n'; sleep 3) "
        "| timeout 10 nc 10.0.2.2 8080 | head -1"
    )
    r = vmctl(env, "exec", box, "--", "sh", "-c", script)
    assert '"object": "list"' in r.stdout and "400" in r.stdout, r.stdout
    requests = [e for e in box_events(env) if e.kind == "request"]
    assert [(e.who_kind, e.who, e.server, e.status) for e in requests][-2:] == [
        ("guest", "box", "s1", 200),
        ("guest", "box", "s1", 400),
    ]
    for args in (("events", "--who", "box"), ("logs", "box"), ("logs", "s1")):
        out = vmctl(env, *args)
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout
        assert "guest:box GET /v1/models 200" in out.stdout
    assert "\\x1b]2;pwned\\x07" in vmctl(env, "events", "--who", "box").stdout
    host_lines = vmctl(env, "events", "--who", "local").stdout
    assert "guest:box" not in host_lines


def test_guest_holds_no_credential_and_no_world_writable_root(
    env: dict[str, str], box: str
) -> None:
    """The route names the guest, so the server's key never enters it; it needs none."""
    look = "stat -c '%a %U' / /etc/vmctl/env; grep -rl sekrit /etc /home 2>/dev/null; true"
    r = vmctl(env, "exec", box, "--", "sh", "-c", look)
    assert r.stdout.splitlines() == ["755 root", "600 agent"], r.stdout
    url = f"http://127.0.0.1:{env['TEST_PORT']}/v1/models"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code == 401  # host callers still need the key


def test_300_held_connections_cost_little_are_refused_past_the_cap_and_released(
    env: dict[str, str], box: str
) -> None:
    m = meta(env, box)
    sidecar = int(str(m["sidecar"]["pid"]))
    srv = json.loads((Path(env["VMCTL_HOME"]) / "servers/s1/server.json").read_text())
    gateway = int(srv["supervisor"]["pid"])
    before = {p: rss_kb(p) for p in (sidecar, gateway)}
    fds_before = nfds(sidecar)
    marker = str(Path(env["VMCTL_HOME"]) / "instances" / box)
    procs_before = ours(marker)
    refused_before = sum(1 for e in box_events(env) if e.reason == "too_many_connections")
    hold = f"for i in $(seq {HELD}); do (sleep 900 | nc 10.0.2.2 8080 >/dev/null 2>&1 &); done"
    r = vmctl(env, "exec", box, "--", "sh", "-c", hold, timeout=300)
    assert r.returncode == 0, r.stdout
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        refused = sum(1 for e in box_events(env) if e.reason == "too_many_connections")
        if refused - refused_before >= HELD - 32:
            break
        time.sleep(1)
    assert refused - refused_before == HELD - 32  # the excess, each audited
    grown = sum(rss_kb(p) - before[p] for p in before)
    held = nfds(sidecar) - fds_before
    procs = ours(marker) - procs_before
    print(f"held={held // 2} host_rss_growth_kb={grown} per_conn_kb={grown / 32:.0f} procs={procs}")
    assert held // 2 == 32  # each held connection: the guest's end and the gateway's
    assert grown / 32 <= 2048  # host memory per held connection
    assert procs <= 2  # no process per connection (a forwarder lives for milliseconds)
    t0 = time.monotonic()
    assert vmctl(env, "exec", box, "--", "true").returncode == 0
    assert time.monotonic() - t0 < 15  # the host (and the guest's exec path) stay responsive
    kill = "kill $(ps | awk '/[n]c 10.0.2.2|[s]leep 900/ {print $1}') 2>/dev/null; true"
    vmctl(env, "exec", box, "--", "sh", "-c", kill)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and nfds(sidecar) > fds_before:
        time.sleep(0.5)
    assert nfds(sidecar) <= fds_before  # everything released
    r = vmctl(env, "exec", box, "--", "sh", "-c", "wget -q -O - http://10.0.2.2:8080/v1/models")
    assert '"object": "list"' in r.stdout


def test_sigkill_of_up_detach_during_boot_leaves_no_qemu(
    env: dict[str, str], tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [*VMCTL, "up", "-d", str(tmp_path), "--name", "killed", "--image", env["TEST_MANIFEST"],
         "--accel", "tcg", "--detach"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    qemu: ProcessRef | None = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and qemu is None:
        time.sleep(0.02)
        try:
            record = meta(env, "killed")
            qemu = ProcessRef.from_json(record.get("qemu"))
        except (OSError, ValueError):
            continue
    assert qemu is not None and qemu.alive()
    # Had the kill landed before the record, the watchdog would find this
    # QEMU by its folder and -name (the user namespace included).
    ipaths = paths.InstancePaths(Path(env["VMCTL_HOME"]) / "instances" / "killed")
    assert guestlaunch.unrecorded_qemu(ipaths) == [qemu]
    # Killed as soon as QEMU is on record: its watchdog is on record already.
    sidecar = ProcessRef.from_json(record["sidecar"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (qemu.alive() or sidecar.alive()):
        time.sleep(0.2)
    assert not qemu.alive() and not sidecar.alive()
    reaped = [e for e in events.read_file(Path(env["VMCTL_HOME"]) / "events/guest-killed.jsonl")]
    assert [e.reason for e in reaped if e.kind == "lifecycle"] == ["owner_died"]
