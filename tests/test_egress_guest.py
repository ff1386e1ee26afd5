"""Real guests (micro image, TCG) behind the egress proxy, driven through the CLI.

The guest reaches only the model and the proxy on the guarded guestfwd path;
its busybox `wget` follows the injected http_proxy, `nc` + `ssl_client` do
CONNECT with real TLS end to end. Every target is a local server on
127.0.0.1 reached through `--resolve` and a CIDR rule naming its port.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need
from egress_peers import BODY, HelloServer, TlsServer
from guests import VMCTL, vmctl
from vmctl.procs import ProcessRef

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
NAMES = ("pkg.test", "tls.test", "other.test", "late.test", "bad.x.test")
# CONNECT by hand, then TLS over the same socket (fd 3): busybox wget sends
# https URLs to a proxy as absolute GETs, which the proxy refuses.
CONNECT = (
    "printf 'GET / HTTP/1.0\\r\\nHost: tls.test\\r\\n\\r\\n' >/tmp/req; "
    "timeout 60 nc 10.0.2.2 3128 -e sh -c '"
    'printf "CONNECT tls.test:{port} HTTP/1.1\\r\\nHost: tls.test\\r\\n\\r\\n"; '
    'read -r status; read -r blank; echo "$status" >&2; exec 3<&0; '
    "ssl_client -s 3 -n tls.test </tmp/req >&2'"
)


def raw_get(url: str) -> str:
    """A proxy request by hand, so the 403 body (the rule) is seen."""
    return f"printf 'GET {url} HTTP/1.0\\r\\n\\r\\n' | timeout 30 nc 10.0.2.2 3128"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    need(bool(subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).stdout), "qemu")
    import platformdirs

    from vmctl.images.choose import resolve_image

    cache = os.environ.get("VMCTL_CACHE") or platformdirs.user_cache_dir("vmctl")
    home = tmp_path_factory.mktemp("eg", numbered=True)
    e = {**os.environ, "VMCTL_HOME": str(home), "VMCTL_CACHE": cache, "VMCTL_QUIET": "1"}
    os.environ["VMCTL_CACHE"] = cache
    e["TEST_MANIFEST"] = str(resolve_image("micro").path)
    yield e
    for root in (home / "instances").glob("*"):
        subprocess.run([*VMCTL, "down", root.name], env=e, timeout=60, check=False)


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HelloServer, TlsServer]]:
    hello, tls = HelloServer(), TlsServer(tmp_path_factory.mktemp("tls"))
    yield hello, tls
    hello.close()
    tls.close()


def ok(env: dict[str, str], *args: str) -> str:
    r = vmctl(env, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def up(env: dict[str, str], ws: Path, name: str, *policy: str) -> subprocess.CompletedProcess[str]:
    model = env["TEST_MODEL"]
    args = ["up", "-d", str(ws), "--name", name, "--image", env["TEST_MANIFEST"], "--detach"]
    args += ["--model-endpoint", model, "--model", "m", "--timeout", "150", "--accel", "tcg"]
    args += list(policy)
    args += [f"--resolve={n}:127.0.0.1" for n in NAMES]
    r = vmctl(env, *args, timeout=200)
    assert r.returncode == 0, r.stderr
    return r


def guest(env: dict[str, str], name: str, script: str) -> str:
    return vmctl(env, "exec", name, "--", "sh", "-c", script, timeout=180).stdout


def test_balanced_guest_through_the_proxy(
    env: dict[str, str], peers: tuple[HelloServer, TlsServer], tmp_path: Path
) -> None:
    hello, tls = peers
    env["TEST_MODEL"] = f"127.0.0.1:{hello.port}"  # a silent model; only the address matters
    up(env, tmp_path, "g1", "--policy", "balanced")
    proxy = ProcessRef.from_json(
        json.loads((Path(env["VMCTL_HOME"]) / "instances/g1/instance.json").read_text())["proxy"]
    )
    try:
        status = json.loads(ok(env, "status", "g1", "--json"))
        assert (status["net"], status["policy"]) == ("model", "balanced")
        assert guest(env, "g1", "echo $http_proxy $HTTPS_PROXY $NO_PROXY").split() == [
            "http://10.0.2.2:3128", "http://10.0.2.2:3128", "10.0.2.2,localhost,127.0.0.1",
        ]  # fmt: skip
        pkg = f"http://pkg.test:{hello.port}/"
        before = guest(env, "g1", f"timeout 30 wget -q -O - {pkg}; echo rc=$?")
        assert BODY.decode() not in before and "rc=1" in before  # balanced: not a registry
        for target in ("pkg.test", f"127.0.0.1:{hello.port}", "tls.test",
                       f"127.0.0.1:{tls.port}", "*.x.test"):  # fmt: skip
            ok(env, "policy", "allow", target, "--for", "g1")  # while the guest runs
        ok(env, "policy", "deny", "bad.x.test", "--for", "g1")
        out = guest(env, "g1", f"timeout 30 wget -q -O - {pkg}")
        assert out == BODY.decode()
        # busybox wget ignores NO_PROXY: asked for the model, the proxy goes to the model.
        assert guest(env, "g1", "timeout 30 wget -q -O - http://10.0.2.2:8080/") == BODY.decode()
        out = guest(env, "g1", "(" + CONNECT.format(port=tls.port) + ") 2>&1")
        assert out.startswith("HTTP/1.1 200 Connection established") and out.endswith("secret")
        out = guest(env, "g1", raw_get(f"http://other.test:{hello.port}/"))
        assert out.startswith("HTTP/1.1 403") and "no rule allows other.test" in out
        out = guest(env, "g1", raw_get(f"http://bad.x.test:{hello.port}/"))
        assert "HTTP/1.1 403" in out and "(rule: deny bad.x.test (for g1))" in out
        ok(env, "policy", "deny", f"pkg.test:{hello.port}", "--for", "g1")
        out = guest(env, "g1", raw_get(pkg))
        assert f"(rule: deny pkg.test:{hello.port} (for g1))" in out  # deny beats allow
    finally:
        ok(env, "down", "g1")
    assert not proxy.alive(), "the proxy sidecar must stop with its guest"
    rows = json.loads(ok(env, "policy", "log", "--for", "g1", "--json"))
    counts = {(r["host"], r["decision"]): r["count"] for r in rows}
    assert counts == {
        ("pkg.test", "deny"): 2, ("pkg.test", "allow"): 1, ("tls.test", "allow"): 1,
        ("other.test", "deny"): 1, ("bad.x.test", "deny"): 1, ("10.0.2.2", "allow"): 1,
    }  # fmt: skip
    model_row = next(r for r in rows if r["host"] == "10.0.2.2")
    assert model_row["rule"] == "model: the caller's model endpoint"
    tls_row = next(r for r in rows if r["host"] == "tls.test")
    assert tls_row["bytes_down"] > 500 and tls_row["rule"].startswith("allow 127.0.0.1/32")


def test_net_full_is_open_and_never_loopback(
    env: dict[str, str], peers: tuple[HelloServer, TlsServer], tmp_path: Path
) -> None:
    hello, _ = peers
    env["TEST_MODEL"] = f"127.0.0.1:{hello.port}"
    r = up(env, tmp_path, "g2", "--net", "full")
    assert "--net full is --policy open now" in r.stderr
    try:
        assert json.loads(ok(env, "status", "g2", "--json"))["policy"] == "open"
        by_ip = f"http://127.0.0.1:{hello.port}/"
        for url in (by_ip, f"http://localhost:{hello.port}/", f"http://pkg.test:{hello.port}/"):
            out = guest(env, "g2", raw_get(url))
            assert out.startswith("HTTP/1.1 403") and "never: loopback address" in out, out
        ok(env, "policy", "allow", f"127.0.0.1:{hello.port}", "--for", "g2")
        assert guest(env, "g2", raw_get(by_ip)).endswith(BODY.decode())
    finally:
        ok(env, "down", "g2")
