"""The hub and its cache on disk: listings, the cache layout, digest sidecars.

Everything here reads the environment at call time (HF_ENDPOINT, HF_TOKEN,
HF_HUB_OFFLINE, HF_HOME/HF_HUB_CACHE), so tests and users can switch hubs
without re-importing. The hub's LFS sha256 is the one truth a file is
checked against; a sidecar in vmctl's state (keyed by a stamp that
includes ctime, which no user can set back) spares re-hashing gigabytes
on each start.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmctl import paths, state, ui
from vmctl.errors import FetchError, ModelError
from vmctl.models.gguf_check import file_stamp
from vmctl.models.spec import check_repo_file

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
REVISION = "main"


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


def hub_kwargs() -> dict[str, Any]:
    """endpoint and token for huggingface_hub calls (its constants are read at import)."""
    return {"endpoint": os.environ.get("HF_ENDPOINT") or None, "token": os.environ.get("HF_TOKEN")}


def repo_dir(repo: str) -> Path:
    return hub_cache() / f"models--{repo.replace('/', '--')}"


def not_cached(what: str, reason: str) -> FetchError:
    if reason == "not pulling":
        return FetchError(f"{what} is not pulled yet", "run `vmctl pull MODEL` first")
    hint = (
        "unset HF_HUB_OFFLINE and run `vmctl pull MODEL`, or use a cached model (`vmctl models`)"
        if reason.startswith("HF_HUB_OFFLINE")
        else "check the network and HF_ENDPOINT, then run `vmctl pull MODEL`"
    )
    return FetchError(f"{what} is not cached and the hub cannot be reached ({reason})", hint)


def first_line(e: BaseException, limit: int = 160) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:limit]


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
        raise not_cached(repo, reason)
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

    kw = hub_kwargs()
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
        raise _Unreachable(first_line(e, 120)) from e
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
    rdir = repo_dir(repo)
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
        files[name] = RemoteFile(name, size, recorded_sha(repo, p))
    return Listing(repo, files, reason)


# -- the cache layout ----------------------------------------------------------


def link_snapshot(repo: str, blob: Path, name: str, commit: str) -> Path:
    """Point snapshots/<commit>/<name> at `blob` and refs/main at `commit`.

    The layout huggingface_hub writes (relative symlinks, refs written
    atomically), so llama.cpp's `-hf` and `local_files_only=True` find it.
    """
    storage = repo_dir(repo)
    pointer = storage / "snapshots" / commit / name
    pointer.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(blob, pointer.parent)
    if not (pointer.is_symlink() and os.readlink(pointer) == target):
        pointer.unlink(missing_ok=True)
        pointer.symlink_to(target)
    ref = storage / "refs" / REVISION
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.is_file() or ref.read_text() != commit:
        tmp = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)
    return pointer


# -- digests -------------------------------------------------------------------


def _sidecar(repo: str, blob: Path) -> Path:
    key = blob.name if re.fullmatch(r"[0-9A-Za-z]{8,128}", blob.name) else None
    key = key or hashlib.sha256(os.fsencode(blob)).hexdigest()
    folder = paths.home() / "models" / f"models--{repo.replace('/', '--')}"
    return paths.private_dir(folder) / f"{key}.json"


def recorded_sha(repo: str, pointer: Path) -> str | None:
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


def remember(
    repo: str, blob: Path, sha: str, hub_sha: str, stamp: dict[str, int] | None = None
) -> None:
    """Record a digest just computed, so `digest` need not hash the file again.

    `stamp` is the one taken before hashing, when given: a file changed
    while it was hashed then fails the stamp check and is hashed again.
    """
    rec = {"sha256": sha, "hub_sha256": hub_sha, "stamp": stamp or file_stamp(blob)}
    state.write_json(_sidecar(repo, blob), rec)


def digest(repo: str, pointer: Path, hub_sha: str) -> str:
    """sha256 of the cached file, re-hashed only when its stamp changed."""
    blob = pointer.resolve()
    stamp = file_stamp(blob)
    try:
        rec = state.read_json(_sidecar(repo, blob), {"sha256": str, "stamp": dict})
        if rec["stamp"] == stamp:
            return str(rec["sha256"])
    except state.StateError:
        pass
    with ui.step(f"verifying {pointer.name}"):
        sha = file_sha256(blob)
    remember(repo, blob, sha, hub_sha, stamp)
    return sha


def evict(repo: str, pointer: Path) -> None:
    """Remove a bad file: blob, snapshot link and sidecar."""
    blob = pointer.resolve()
    _sidecar(repo, blob).unlink(missing_ok=True)
    blob.unlink(missing_ok=True)
    pointer.unlink(missing_ok=True)
