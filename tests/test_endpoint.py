"""How `vmctl up` and `vmctl run` choose a model endpoint and its key (vmctl.endpoint).

The peers are faked, not the code: servers are real state folders written
the way the supervisor writes them (with this process standing in as their
live supervisor), endpoints are loopback HTTP stubs that enforce a key.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import StubFactory, StubRequest, free_port, vmctl_cmd
from vmctl import agents, contract, endpoint, paths
from vmctl.errors import ClientError, ConfigError, NotFoundError
from vmctl.procs import ProcessRef
from vmctl.serve.record import ServerRecord
from vmctl.state import write_json

KEY = "k3y-of-the-server"


def keyed(key: str | None, model: str = "m1"):  # type: ignore[no-untyped-def]
    """An endpoint answer that lists `model` only to callers with `key`."""

    def answer(req: StubRequest) -> tuple[int, bytes]:
        if key and req.headers.get("Authorization") != f"Bearer {key}":
            return 401, b'{"error":{"message":"invalid or missing API key"}}'
        body = {"data": [{"id": model, "meta": {"n_ctx": 4096}}]}
        return 200, json.dumps(body).encode()

    return answer


def fake_server(name: str, port: int, api_key: str | None = None, alias: str = "m1") -> Path:
    """A running server's state folder, as `vmctl.supervisor` writes it."""
    sp = paths.server(name)
    paths.private_dir(sp.root)
    ServerRecord(
        name=name, alias=alias, host="127.0.0.1", port=port, api_key=api_key, sandbox=True,
        model="/models/m.gguf", supervisor=ProcessRef.of(os.getpid()), llama=None,
        started=time.time(), state="ready",
    ).write(sp.meta)  # fmt: skip
    return sp.root


# --- which endpoint -----------------------------------------------------------


def test_no_server_and_no_url_is_none() -> None:
    assert endpoint.locate() is None


def test_the_one_running_server_is_used_with_its_key() -> None:
    fake_server("only", 18001, KEY)
    loc = endpoint.locate()
    assert loc is not None
    assert (loc.origin, loc.server, loc.api_key, loc.alias) == (
        "http://127.0.0.1:18001", "only", KEY, "m1"
    )  # fmt: skip


def test_several_servers_need_server_name_and_the_error_lists_them() -> None:
    fake_server("a", 18001)
    fake_server("b", 18002, KEY)
    with pytest.raises(ConfigError) as e:
        endpoint.locate()
    assert "2 vmctl servers are running" in e.value.message
    assert "a (http://127.0.0.1:18001)" in e.value.message and "b (" in e.value.message
    assert e.value.hint == "choose one with --server NAME"
    loc = endpoint.locate(server="b")
    assert loc is not None and (loc.port, loc.api_key) == (18002, KEY)
    with pytest.raises(NotFoundError) as missing:
        endpoint.locate(server="c")
    assert "'c'" in missing.value.message and "a (" in str(missing.value.hint)


def test_stopped_servers_do_not_count() -> None:
    fake_server("live", 18001)
    dead = fake_server("dead", 18002)
    meta = json.loads((dead / "server.json").read_text())
    meta["supervisor"] = {"pid": 999999, "start": "0"}
    write_json(dead / "server.json", meta)
    loc = endpoint.locate()
    assert loc is not None and loc.server == "live"


def test_an_endpoint_url_that_is_a_vmctl_server_uses_its_key() -> None:
    fake_server("s", 18003, KEY)
    for url in ("http://127.0.0.1:18003/v1", "localhost:18003", "http://localhost:18003"):
        loc = endpoint.locate(url)
        assert loc is not None and (loc.server, loc.api_key) == ("s", KEY), url


def test_other_endpoints_take_api_key_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loc = endpoint.locate("http://127.0.0.1:18004")
    assert loc is not None and (loc.server, loc.api_key) == (None, None)
    monkeypatch.setenv("VMCTL_API_KEY", "from-env")
    assert endpoint.locate("127.0.0.1:18004").api_key == "from-env"  # type: ignore[union-attr]
    assert endpoint.locate("127.0.0.1:18004", api_key="flag").api_key == "flag"  # type: ignore[union-attr]


def test_endpoint_and_server_together_and_bad_urls_are_refused() -> None:
    with pytest.raises(ConfigError, match="both name an endpoint"):
        endpoint.locate("127.0.0.1:1", server="x")
    for bad in ("ftp://h:1", "http://h:1/path", "http://:1", "h:99999", "nope", "h:"):
        with pytest.raises(ConfigError, match="invalid --endpoint"):
            endpoint.locate(bad)
    assert endpoint.parse_origin("http://h")[2] == 80  # a URL keeps its scheme's port
    with pytest.raises(ConfigError, match="invalid --api-key"):
        endpoint.locate("127.0.0.1:1", api_key="two words")


def test_a_key_in_a_folder_others_can_touch_is_refused() -> None:
    root = fake_server("lax", 18005, KEY)
    root.chmod(0o755)
    with pytest.raises(ConfigError, match="not private to you"):
        endpoint.locate()
    root.chmod(0o700)
    (root / "server.json").chmod(0o666)
    with pytest.raises(ConfigError, match="not private to you"):
        endpoint.locate()


# --- does it answer, with that key --------------------------------------------


def test_a_keyed_vmctl_server_is_reached_without_typing_the_key(http_stub: StubFactory) -> None:
    stub = http_stub(keyed(KEY))
    fake_server("s", stub.port, KEY)
    target = endpoint.find_endpoint()
    assert (target.models, target.context, target.api_key) == (("m1",), 4096, KEY)
    assert stub.requests[-1].headers["Authorization"] == f"Bearer {KEY}"


def test_401_without_a_key_says_the_endpoint_needs_one(http_stub: StubFactory) -> None:
    stub = http_stub(keyed(KEY))
    with pytest.raises(ClientError) as e:
        endpoint.find_endpoint(stub.url)
    assert e.value.message == f"{stub.url} needs an API key (HTTP 401)"
    assert "--api-key" in str(e.value.hint) and "VMCTL_API_KEY" in str(e.value.hint)


def test_a_wrong_key_is_one_clear_line(http_stub: StubFactory) -> None:
    stub = http_stub(keyed(KEY))
    with pytest.raises(ClientError) as e:
        endpoint.find_endpoint(stub.url, api_key="wrong")
    assert e.value.message == f"{stub.url} refused the API key (HTTP 401)"
    fake_server("stale", stub.port, "old-key")
    with pytest.raises(ClientError) as stale:
        endpoint.find_endpoint()
    assert "refused the key in its own state" in stale.value.message
    assert "vmctl stop stale" in str(stale.value.hint)


def test_nothing_answering_and_no_models_are_told_apart(http_stub: StubFactory) -> None:
    with pytest.raises(ClientError, match="no model endpoint answers"):
        endpoint.find_endpoint(f"http://127.0.0.1:{free_port()}")
    empty = http_stub(lambda req: (200, b'{"data": []}'))
    with pytest.raises(ClientError, match="lists no model"):
        endpoint.find_endpoint(empty.url)


# --- the guest's view -----------------------------------------------------------


def test_guest_address_comes_from_the_contract() -> None:
    net = contract.raw()["network"]
    model = f"http://{net['model_host']}:{net['model_port']}"
    assert endpoint.guest_origin("127.0.0.1", 18006, "model") == model
    assert endpoint.guest_origin("127.0.0.1", 18006, "full") == f"http://{net['model_host']}:18006"
    assert endpoint.guest_origin("192.0.2.7", 18006, "full") == "http://192.0.2.7:18006"


def test_up_keeps_the_servers_key_out_of_the_guest(http_stub: StubFactory) -> None:
    """The keyed server is used with no key typed, and no key enters the guest: its
    sidecar's route to the gateway is authenticated by which guest it is."""
    stub = http_stub(keyed(KEY))
    fake_server("s", stub.port, KEY)
    plan = endpoint.plan_guest()
    assert (plan.net, plan.endpoint) == ("model", ("127.0.0.1", stub.port))
    env = plan.files["opt/vmctl/env"].decode()
    assert KEY not in env and all(KEY.encode() not in f for f in plan.files.values())
    assert f"OPENAI_API_KEY={agents.DUMMY_API_KEY}\n" in env
    net = contract.raw()["network"]
    assert f"OPENAI_BASE_URL=http://{net['model_host']}:{net['model_port']}/v1\n" in env


def test_up_reports_a_keyed_endpoint_instead_of_no_model(http_stub: StubFactory) -> None:
    stub = http_stub(keyed(KEY))
    with pytest.raises(ClientError, match="needs an API key"):
        endpoint.plan_guest(f"127.0.0.1:{stub.port}", model="m1")
    plan = endpoint.plan_guest(f"127.0.0.1:{stub.port}", api_key=KEY)
    assert b"OPENAI_API_KEY=" + KEY.encode() in plan.files["opt/vmctl/env"]


def test_up_accepts_a_silent_endpoint_only_with_a_model() -> None:
    port = free_port()
    plan = endpoint.plan_guest(f"127.0.0.1:{port}", model="later")
    assert plan.endpoint == ("127.0.0.1", port) and b"later" in plan.files["opt/vmctl/env"]
    with pytest.raises(ConfigError, match="does not answer"):
        endpoint.plan_guest(f"127.0.0.1:{port}")
    assert endpoint.plan_guest(net="none") == endpoint.GuestPlan("none", None, {})


# --- through the CLI: one line, no traceback --------------------------------------


def test_run_and_up_say_which_servers_to_choose_from(vmctl_home: Path, tmp_path: Path) -> None:
    fake = subprocess.Popen(["sleep", "60"])  # a live "supervisor" for both servers
    try:
        for name, port in (("one", 18007), ("two", 18008)):
            fake_server(name, port)
            meta = json.loads((vmctl_home / "servers" / name / "server.json").read_text())
            meta["supervisor"] = ProcessRef.of(fake.pid).to_json()
            write_json(vmctl_home / "servers" / name / "server.json", meta)
        ws = tmp_path / "ws"
        ws.mkdir()
        env = {**os.environ, "VMCTL_HOME": str(vmctl_home)}
        for argv in (["run", "shell", "-w", str(ws)], ["up", "-d", str(ws), "--image", "micro"]):
            out = subprocess.run(vmctl_cmd(*argv), env=env, capture_output=True, text=True,
                                 timeout=60, check=False)  # fmt: skip
            assert out.returncode == 2, out.stderr
            assert "2 vmctl servers are running: one (http://127.0.0.1:18007)" in out.stderr
            assert "--server NAME" in out.stderr and "Traceback" not in out.stderr
    finally:
        fake.kill()
        fake.wait()
