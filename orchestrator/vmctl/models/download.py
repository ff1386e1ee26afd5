"""Downloads into huggingface_hub's cache that survive Ctrl-C and crashes.

huggingface_hub retries a dropped connection within one run, but names
its partial files uniquely and deletes them on failure, so an interrupted
`vmctl pull` of a 20 GB GGUF would start again from zero. LFS files (the
GGUFs) are therefore fetched here: into `blobs/<sha256>.incomplete` (the
stable name older huggingface_hub releases resumed from), continued with
an HTTP Range request from the length on disk, hashed while written and
moved into the same cache layout huggingface_hub writes. A resumed file
can splice garbage (a crash before the page cache reached the disk), so
a digest mismatch deletes the partial and fetches once from zero. Small
git files still go through `hf_hub_download`, as does every lookup while
offline.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vmctl import ui
from vmctl.errors import FetchError
from vmctl.models.hub import (
    COMMIT_RE,
    REVISION,
    Listing,
    RemoteFile,
    digest,
    evict,
    first_line,
    hub_cache,
    hub_kwargs,
    link_snapshot,
    not_cached,
    recorded_sha,
    remember,
    repo_dir,
)

PARTIAL = ".incomplete"
RETRIES = 5  # requests in a row that bring no new byte before giving up
_RANGE_RE = re.compile(r"^bytes (\d+)-\d+/(?:\d+|\*)$")


def fetch_file(listing: Listing, name: str) -> Path:
    """Download (or find) one file and prove it matches the hub's sha256.

    A mismatch deletes the file and fetches it once more; a second mismatch
    (or one found offline) is refused, and the bad file is gone either way.
    """
    path = _get(listing, name)
    remote = listing.files.get(name)
    hub_sha = (remote.sha256 if remote else None) or recorded_sha(listing.repo, path)
    if hub_sha is None:
        return path  # a small git file: huggingface_hub checked it by its git etag
    if digest(listing.repo, path, hub_sha) == hub_sha:
        return path
    evict(listing.repo, path)
    what = f"{listing.repo}:{name}"
    if listing.offline is not None:
        raise FetchError(
            f"cached {what} does not match the hub's sha256 and was deleted",
            "pull it again with the hub reachable (`vmctl pull MODEL`)",
        )
    ui.warn(f"cached {what} does not match the hub's sha256; fetching it again")
    path = _get(listing, name, force=True)
    got = digest(listing.repo, path, hub_sha)
    if got != hub_sha:
        evict(listing.repo, path)
        raise _mismatch(what, got, hub_sha)
    return path


def _mismatch(what: str, got: str, hub_sha: str) -> FetchError:
    return FetchError(
        f"{what} does not match the hub's sha256 (got {got[:12]}, hub says {hub_sha[:12]})",
        "the download or the mirror (HF_ENDPOINT) is corrupt; the file was deleted",
    )


def _get(listing: Listing, name: str, *, force: bool = False) -> Path:
    remote = listing.files.get(name)
    if listing.offline is None and remote is not None and remote.sha256 is not None:
        return pull_lfs(listing.repo, remote)
    return _hf_download(listing, name, force=force)


# -- small files and offline lookups: huggingface_hub itself --------------------


def _tqdm_class() -> Any:
    if not ui.is_quiet():
        return None
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    class Silent(hf_tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    return Silent


def _hf_download(listing: Listing, name: str, *, force: bool = False) -> Path:
    """One file into the hub cache through `hf_hub_download` (or found there offline)."""
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
            **hub_kwargs(),
        )
    except LocalEntryNotFoundError as e:
        raise not_cached(what, listing.offline or "connection failed") from e
    except EntryNotFoundError as e:
        raise FetchError(f"the hub has no file {what}", "see the repo's file list") from e
    except (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError) as e:
        raise FetchError(f"download of {what} failed: {first_line(e)}", "retry `vmctl pull`") from e
    return Path(str(found))


# -- LFS files: resumable across runs -------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where one LFS file comes from, as the hub's HEAD answered."""

    what: str  # org/repo:file, for messages
    url: str
    headers: dict[str, str]
    size: int
    sha256: str
    commit: str


def pull_lfs(repo: str, remote: RemoteFile) -> Path:
    """An LFS file into the hub cache, resuming a partial left by an earlier run.

    Holds huggingface_hub's own lock for the blob, so neither a second
    `vmctl pull` nor `hf_hub_download` writes the same file meanwhile.
    """
    from huggingface_hub.utils import WeakFileLock  # type: ignore[attr-defined]

    src = _source(repo, remote)
    blob = repo_dir(repo) / "blobs" / src.sha256
    lock = hub_cache() / ".locks" / repo_dir(repo).name / f"{src.sha256}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if not blob.is_file():
            _fetch_blob(repo, src, blob)
        return link_snapshot(repo, blob, remote.name, src.commit)


def _source(repo: str, remote: RemoteFile) -> Source:
    """HEAD the file: its commit, size and sha256, with the URL and headers to GET it."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    kw, what, sha = hub_kwargs(), f"{repo}:{remote.name}", remote.sha256
    url = hf_hub_url(repo, remote.name, revision=REVISION, endpoint=kw["endpoint"])
    try:
        meta = get_hf_file_metadata(url, token=kw["token"], endpoint=kw["endpoint"])
    except EntryNotFoundError as e:
        raise FetchError(f"the hub has no file {what}", "see the repo's file list") from e
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:
        raise FetchError(f"download of {what} failed: {first_line(e)}", "retry `vmctl pull`") from e
    commit, size = meta.commit_hash or "", meta.size or remote.size
    if sha is None or meta.etag != sha or not COMMIT_RE.match(commit) or size is None:
        raise FetchError(
            f"the hub's answer for {what} does not match its file listing",
            "the repo may have changed meanwhile: run `vmctl pull` again",
        )
    headers = build_hf_headers(token=kw["token"])
    headers["Accept-Encoding"] = "identity"  # byte offsets must be offsets into the file
    return Source(what, url, headers, size, sha, commit)


def _fetch_blob(repo: str, src: Source, blob: Path) -> None:
    """Resume (or start) the partial, verify it, move it to `blob`; once more from zero."""
    partial = blob.with_name(blob.name + PARTIAL)
    for attempt in (1, 2):
        try:
            got = _complete(src, partial)
        except OSError as e:  # the disk, not the network: a full disk, a read-only cache
            raise FetchError(
                f"cannot write {partial}: {e.strerror or e}", "check the disk and HF_HUB_CACHE"
            ) from e
        if got == src.sha256:
            partial.replace(blob)
            remember(repo, blob, got, src.sha256)
            return
        partial.unlink(missing_ok=True)
        if attempt == 1:
            ui.warn(f"{src.what} does not match the hub's sha256; fetching it again from zero")
    raise _mismatch(src.what, got, src.sha256)


class _Partial:
    """The partial file: its length and the sha256 of what it holds, kept in step."""

    def __init__(self, f: BinaryIO, size: int, bar: Any) -> None:
        self.f, self.size, self.bar = f, size, bar
        self.offset, self.sha = 0, hashlib.sha256()
        while chunk := f.read(1 << 20):  # hash what an earlier run left
            self.sha.update(chunk)
            self.offset += len(chunk)
        bar.update(self.offset)

    def restart(self) -> None:
        self.f.seek(0)
        self.f.truncate()
        self.offset, self.sha = 0, hashlib.sha256()
        self.bar.reset(total=self.size)

    def write(self, chunk: bytes) -> bool:
        """Append; False once the file is full (a server sending more is cut short)."""
        chunk = chunk[: self.size - self.offset]
        self.f.write(chunk)
        self.sha.update(chunk)
        self.offset += len(chunk)
        self.bar.update(len(chunk))
        return self.offset < self.size


def _complete(src: Source, path: Path) -> str:
    """Bring the partial at `path` to the full size; return its sha256."""
    import httpx2

    if path.exists() and path.stat().st_size > src.size:
        path.unlink()  # longer than the file: not a prefix of it
    path.touch()
    have, free = path.stat().st_size, shutil.disk_usage(path.parent).free
    if free < src.size - have:
        raise FetchError(
            f"not enough disk space for {src.what}: "
            f"{(src.size - have) >> 20} MiB to go, {free >> 20} MiB free",
            f"free space in {path.parent} or point HF_HUB_CACHE elsewhere",
        )
    if have:
        ui.info(f"resuming {src.what} at {have >> 20} of {src.size >> 20} MiB")
    with path.open("r+b") as f, _progress(src) as bar:
        part, misses = _Partial(f, src.size, bar), 0
        while part.offset < src.size:
            before, error = part.offset, None
            try:
                _get_range(src, part)
            except httpx2.RequestError as e:
                error = e  # a dropped connection: ask again from where the file ends
            misses = 0 if part.offset > before else misses + 1
            if misses > RETRIES:
                why = first_line(error) if error else "no progress"
                raise FetchError(
                    f"download of {src.what} failed: {why}",
                    "run `vmctl pull` again: it resumes where this stopped",
                ) from error
            if misses:
                time.sleep(min(2.0 ** (misses - 1), 8.0))
        return part.sha.hexdigest()


def _get_range(src: Source, part: _Partial) -> None:
    """One GET from `part.offset`; a server that ignores Range starts us from zero."""
    from huggingface_hub import constants, hf_raise_for_status
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import http_stream_backoff  # type: ignore[attr-defined]

    headers = dict(src.headers)
    if part.offset:
        headers["Range"] = f"bytes={part.offset}-"
    timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
    with http_stream_backoff(
        "GET", src.url, headers=headers, timeout=timeout, retry_on_exceptions=()
    ) as r:
        if r.status_code == 416:  # the server thinks our offset is past its end
            part.restart()
            return
        try:
            hf_raise_for_status(r)
        except HfHubHTTPError as e:
            raise FetchError(
                f"download of {src.what} failed: {first_line(e)}", "run `vmctl pull` again"
            ) from e
        m = _RANGE_RE.match(r.headers.get("Content-Range", ""))
        if r.status_code == 200:
            part.restart()  # the whole file, whatever we asked for: take it from zero
        elif r.status_code != 206 or m is None or int(m[1]) != part.offset:
            part.restart()  # not the range we asked for: ask again from zero
            return
        for chunk in r.iter_bytes():
            if not part.write(chunk):
                break


@contextmanager
def _progress(src: Source) -> Iterator[Any]:
    """A byte progress bar on stderr, silent when vmctl is quiet."""
    from huggingface_hub.utils.tqdm import tqdm

    name = src.what.partition(":")[2].rsplit("/", 1)[-1]
    bar = tqdm(  # type: ignore[no-untyped-call]
        total=src.size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name if len(name) <= 40 else f"(…){name[-40:]}",
        disable=ui.is_quiet(),
    )
    try:
        yield bar
    finally:
        bar.close()
