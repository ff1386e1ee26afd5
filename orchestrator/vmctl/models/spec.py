"""Model specs: what the user typed, turned into something safe to fetch.

A spec is a catalog alias, `org/repo:file.gguf`, `org/repo:QUANT`, bare
`org/repo`, or a local path. Repo ids and file parts are checked before
anything touches the network or the disk: hub URLs normalise `..`, so an
unchecked `org/repo:../../evil.gguf` would download fine and then be
written outside the cache. The quant rules follow llama.cpp's `-hf`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from vmctl.errors import ModelError

REPO_RE = re.compile(r"^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$")
PART_RE = re.compile(r"^[A-Za-z0-9._+-]+$")
QUANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
DEFAULT_QUANT = "Q4_K_M"
_MAX_SPEC = 512

_HINT = "use a catalog alias (see `vmctl models`), org/repo:FILE.gguf, org/repo:QUANT or a path"


@dataclass(frozen=True)
class CatalogSpec:
    name: str


@dataclass(frozen=True)
class HubSpec:
    repo: str
    file: str | None = None  # exact file in the repo
    quant: str | None = None  # else a quant label (None: DEFAULT_QUANT or the only GGUF)


@dataclass(frozen=True)
class PathSpec:
    path: Path


ModelSpec = CatalogSpec | HubSpec | PathSpec


def check_repo_id(repo: str) -> str:
    """Refuse anything but `org/name` made of safe characters."""
    if not REPO_RE.match(repo) or any(p in {".", ".."} for p in repo.split("/")):
        raise ModelError(f"invalid hub repo id {repo!r}", "a repo id looks like org/name")
    return repo


def check_repo_file(name: str) -> str:
    """Refuse absolute, empty, `..` or odd-character file paths inside a repo."""
    parts = name.split("/")
    if not name or len(name) > 255 or any(p in {"", ".", ".."} for p in parts):
        raise ModelError(f"invalid file name {name!r}", "give a relative file path inside the repo")
    if not all(PART_RE.match(p) for p in parts):
        raise ModelError(f"invalid file name {name!r}", "file names may use A-Z a-z 0-9 . _ + -")
    return name


def check_quant(label: str) -> str:
    if not QUANT_RE.match(label):
        raise ModelError(
            f"invalid quant label {label!r}", "a quant looks like Q4_K_M or UD-Q6_K_XL"
        )
    return label


def _looks_like_path(spec: str) -> bool:
    if spec.startswith(("./", "/", "~")):
        return True
    if "/" not in spec:
        return False
    try:
        return Path(spec).exists()
    except (OSError, ValueError):
        return False


def parse_spec(spec: str) -> ModelSpec:
    """Turn a user's spec into a checked `ModelSpec`, or raise `ModelError`."""
    from vmctl.models import catalog

    spec = spec.strip()
    if not spec or len(spec) > _MAX_SPEC or "\0" in spec or not spec.isprintable():
        raise ModelError(f"invalid model spec {spec[:80]!r}", _HINT)
    if _looks_like_path(spec):
        try:
            path = Path(spec).expanduser()
            exists = path.exists()
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: ~nosuchuser
            raise ModelError(f"cannot read model path {spec!r}", _HINT) from e
        if not exists:
            raise ModelError(f"no such model file: {path}", _HINT)
        return PathSpec(path.absolute())
    if ":" in spec:
        repo, _, rest = spec.partition(":")
        check_repo_id(repo)
        if rest.lower().endswith(".gguf"):
            return HubSpec(repo, file=check_repo_file(rest))
        return HubSpec(repo, quant=check_quant(rest))
    if "/" in spec:
        return HubSpec(check_repo_id(spec))
    if catalog.lookup(spec) is not None:
        return CatalogSpec(spec.lower())
    close = catalog.close_matches(spec)
    maybe = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ModelError(f"unknown model {spec!r}{maybe}", "run `vmctl models` to list the catalog")


# -- picking files from a repo listing ---------------------------------------


def is_mmproj(name: str) -> bool:
    return "mmproj" in name.rsplit("/", 1)[-1].lower()


def _quant_re(label: str) -> re.Pattern[str]:
    return re.compile(rf"(?:^|[-_./]){re.escape(label)}(?=[-_.]|$)", re.IGNORECASE)


def _ends_with(name: str, label: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    m = SPLIT_RE.match(base)
    stem = m.group("stem") if m else base[: -len(".gguf")]
    return bool(re.search(rf"(?:^|[-_.]){re.escape(label)}$", stem, re.IGNORECASE))


def split_parts(name: str) -> tuple[str, ...]:
    """Every part of a split GGUF named like one of its parts (else just `name`)."""
    folder, _, base = name.rpartition("/")
    m = SPLIT_RE.match(base)
    if not m:
        return (name,)
    count = int(m.group("count"))
    if count < 1 or int(m.group("no")) > count:
        raise ModelError(f"invalid split file name {name!r}", "parts are -0000K-of-0000N.gguf")
    prefix = f"{folder}/" if folder else ""
    stem = m.group("stem")
    return tuple(f"{prefix}{stem}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1))


def select_quant(names: list[str], label: str | None) -> tuple[str, ...]:
    """The file (or every split part) of the model carrying quant `label`.

    Case-insensitive, bounded by `-`, `_`, `.` (F16 never matches BF16);
    names ending with the label win (Q6_K over Q6_K_XL); mmproj files are
    never the model. With no label: Q4_K_M, else the only GGUF there is.
    """
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf") and not is_mmproj(n))
    if label is None:
        if any(_quant_re(DEFAULT_QUANT).search(n) for n in ggufs):
            label = DEFAULT_QUANT
        elif len({split_parts(n) for n in ggufs}) == 1:
            return _complete(split_parts(ggufs[0]), set(names))
        else:
            raise ModelError("the repo has several GGUF files and no Q4_K_M", _quant_hint(ggufs))
    pattern = _quant_re(label)
    found = [n for n in ggufs if pattern.search(n)]
    if not found:
        raise ModelError(f"no GGUF file for quant {label!r} in the repo", _quant_hint(ggufs))
    exact = [n for n in found if _ends_with(n, label)] or found
    best = min(exact, key=lambda n: (len(n), n))
    return _complete(split_parts(best), set(names))


def _complete(parts: tuple[str, ...], names: set[str]) -> tuple[str, ...]:
    missing = [p for p in parts if p not in names]
    if missing:
        raise ModelError(
            f"split model {parts[0]!r} is missing {len(missing)} of {len(parts)} parts",
            f"the repo lacks {missing[0]}",
        )
    return parts


def _quant_hint(ggufs: list[str]) -> str:
    shown = ", ".join(n.rsplit("/", 1)[-1] for n in ggufs[:6]) or "none"
    return f"pick one with org/repo:QUANT or org/repo:FILE.gguf (files: {shown})"


def pick_mmproj(files: dict[str, int | None]) -> str | None:
    """The vision projector to fetch: F16, then BF16, then the smallest."""
    cands = [n for n in files if is_mmproj(n) and n.lower().endswith(".gguf")]
    if not cands:
        return None

    def rank(n: str) -> tuple[int, int, str]:
        pref = 0 if _quant_re("F16").search(n) else 1 if _quant_re("BF16").search(n) else 2
        return (pref, files[n] or 1 << 62, n)

    return min(cands, key=rank)


def safe_join(root: Path, name: str) -> Path:
    """`root/name` for a checked repo file name, proven to stay under root."""
    target = Path(os.path.normpath(root / check_repo_file(name)))
    if os.path.commonpath([target, os.path.normpath(root)]) != os.path.normpath(root):
        raise ModelError(f"file name {name!r} escapes its folder", _HINT)
    return target
