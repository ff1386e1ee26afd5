"""`vmctl run shell --policy`: the egress proxy bridged into a real bwrap sandbox.

A probe (Python on the bridge's interpreter, so nothing new enters the
sandbox) makes requests through HTTP_PROXY as the sandbox sets it; every
target is a local server reached through `--resolve`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import HttpStub, StubFactory, StubRequest
from egress_peers import BODY, HelloServer, TlsServer

VMCTL = [sys.executable, "-m", "vmctl"]
PY = os.path.realpath(sys.executable)

PROBE = """
import json, os, ssl, sys, time, urllib.error, urllib.request
proxy = os.environ["HTTP_PROXY"]
for k in ("NO_PROXY", "no_proxy"):  # loopback targets must go through the proxy too
    os.environ.pop(k, None)
ctx = ssl.create_default_context(cafile=sys.argv[1])
opener = urllib.request.build_opener(
    urllib.request.ProxyHandler({"http": proxy, "https": proxy}),
    urllib.request.HTTPSHandler(context=ctx))
def get(url):
    try:
        with opener.open(url, timeout=20) as r:
            return [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        return [e.code, e.read().decode()]
    except Exception as e:
        return [0, repr(e)]
out = {}
for url in sys.argv[2:]:
    if url == "WAIT":  # the host adds a rule, then lets the probe go on
        open("waiting", "w").close()
        while not os.path.exists("go"):
            time.sleep(0.1)
        continue
    out.setdefault(url, []).append(get(url))
print("PROBE " + json.dumps({"proxy": proxy, "out": out}), flush=True)
"""


def _openai(req: StubRequest) -> tuple[int, bytes]:
    return 200, json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode()


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[HelloServer, TlsServer]]:
    hello, tls = HelloServer(), TlsServer(tmp_path)
    yield hello, tls
    hello.close()
    tls.close()


def vmctl(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*VMCTL, *args], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r


def start_probe(ws: Path, model: HttpStub, policy: str, *urls: str) -> subprocess.Popen[str]:
    (ws / "probe.py").write_text(PROBE)
    names = ("pkg.test", "tls.test", "other.test", "bad.x.test", "ok.x.test", "late.test")
    resolve = [f"--resolve={n}:127.0.0.1" for n in names]
    argv = [*VMCTL, "run", "shell", "-w", str(ws), "--endpoint", model.url, "--policy", policy]
    argv += [*resolve, "--", PY, "-I", "-S", "probe.py", "ca.pem", *urls]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen[str]) -> dict[str, list[list[object]]]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    line = next(x for x in out.splitlines() if x.startswith("PROBE "))
    data = json.loads(line[6:])
    assert data["proxy"] == "http://127.0.0.1:3128"
    return dict(data["out"])


def test_run_shell_under_balanced_then_open(
    bwrap_bin: Path, workspace: Path, http_stub: StubFactory, peers: tuple[HelloServer, TlsServer]
) -> None:
    hello, tls = peers
    model = http_stub(_openai)
    (workspace / "ca.pem").write_bytes(tls.cert.read_bytes())
    for target in ("pkg.test", f"127.0.0.1:{hello.port}", "tls.test", f"127.0.0.1:{tls.port}",
                   "*.x.test"):  # fmt: skip
        vmctl("policy", "allow", target, "--for", "shell")
    vmctl("policy", "deny", "bad.x.test", "--for", "shell")
    pkg, other = f"http://pkg.test:{hello.port}/", f"http://other.test:{hello.port}/"
    bad, ok = f"http://bad.x.test:{hello.port}/", f"http://ok.x.test:{hello.port}/"
    late = f"http://late.test:{hello.port}/"
    model_url = f"http://127.0.0.1:{model.port}/v1/models"  # asked of the proxy: the model
    probe = start_probe(workspace, model, "balanced", pkg, f"https://tls.test:{tls.port}/",
                        other, bad, ok, late, model_url, "WAIT", late)  # fmt: skip
    for _ in range(600):
        if (workspace / "waiting").exists() or probe.poll() is not None:
            break
        time.sleep(0.1)
    vmctl("policy", "allow", "late.test", "--for", "shell")  # while it runs
    (workspace / "go").touch()
    out = result(probe)
    assert out[pkg] == [[200, BODY.decode()]]
    assert out[f"https://tls.test:{tls.port}/"] == [[200, "secret"]]  # CONNECT, TLS untouched
    assert out[other][0][0] == 403
    assert "no rule allows other.test" in str(out[other][0][1])
    assert out[bad][0][0] == 403 and "rule: deny bad.x.test (for shell)" in str(out[bad][0][1])
    assert out[ok][0][0] == 200
    assert [code for code, _ in out[late]] == [403, 200]  # the next connection sees the rule
    assert out[model_url][0][0] == 200 and "fake-model" in str(out[model_url][0][1])

    loop_ip, loop_name = f"http://127.0.0.1:{hello.port}/", f"http://localhost:{hello.port}/"
    vmctl("policy", "rm", f"127.0.0.1:{hello.port}", "--for", "shell")
    out = result(start_probe(workspace, model, "open", loop_ip, loop_name, pkg, "WAIT", loop_ip))
    for url in (loop_ip, loop_name, pkg):  # literal, name, --resolve name: all loopback
        code, body = out[url][0]
        assert code == 403 and "never: loopback address" in str(body), (url, body)
    assert out[loop_ip][1][0] == 403  # no rule added this time: still refused

    rows = json.loads(vmctl("policy", "log", "--for", "shell", "--json").stdout)
    counts = {(r["host"], r["decision"]): r["count"] for r in rows}
    assert counts == {
        ("pkg.test", "allow"): 1, ("pkg.test", "deny"): 1, ("tls.test", "allow"): 1,
        ("other.test", "deny"): 1, ("bad.x.test", "deny"): 1, ("ok.x.test", "allow"): 1,
        ("late.test", "deny"): 1, ("late.test", "allow"): 1, ("127.0.0.1", "deny"): 2,
        ("127.0.0.1", "allow"): 1,
        ("localhost", "deny"): 1,
    }  # fmt: skip
    assert all(r["who"] == "client-shell" for r in rows)
