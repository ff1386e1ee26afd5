"""The model catalog: aliases with their hub source, sampling and context.

The catalog is data (`data/catalog.toml`), validated here once so that a
typo in it names the entry and the field instead of surfacing later as a
bad llama-server flag. Sampling keys come from an allow-list: the catalog
can tune llama-server, never hand it arbitrary options.
"""

from __future__ import annotations

import difflib
import functools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmctl import paths
from vmctl.errors import ModelError
from vmctl.models.names import ALIAS_RE, check_quant, check_repo_file, check_repo_id

DEFAULT_MODEL = "smollm2-135m"

#: llama-server sampling flags a catalog entry may set, with their value type.
SAMPLING_FLAGS: dict[str, type] = {
    "temp": float,
    "top-p": float,
    "top-k": int,
    "min-p": float,
    "presence-penalty": float,
    "frequency-penalty": float,
    "repeat-penalty": float,
}
_FIELDS = {
    "description",
    "repo",
    "quant",
    "file",
    "embedded",
    "install",
    "context",
    "mmproj",
    "sampling",
    "chat-template-kwargs",
}


@dataclass(frozen=True)
class CatalogEntry:
    """One catalog model; `name` is also the alias clients see."""

    name: str
    description: str
    repo: str | None
    quant: str | None
    file: str | None
    embedded: str | None
    install: str | None
    context: int | None
    mmproj: bool
    sampling: tuple[tuple[str, float | int], ...]
    template_kwargs: str | None  # compact JSON for --chat-template-kwargs

    def server_args(self) -> tuple[str, ...]:
        """Sampling and template settings as llama-server flags."""
        args: list[str] = []
        for flag, value in self.sampling:
            args += [f"--{flag}", _fmt(value)]
        if self.template_kwargs is not None:
            args += ["--chat-template-kwargs", self.template_kwargs]
        return tuple(args)


def _fmt(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bad(name: str, field: str, why: str) -> ModelError:
    return ModelError(
        f"catalog entry {name!r}: field {field!r} {why}",
        "fix vmctl's data/catalog.toml",
    )


def _opt(name: str, raw: dict[str, Any], field: str, typ: type) -> Any:
    value = raw.get(field)
    if value is None:
        return None
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise _bad(name, field, f"must be a {typ.__name__}, not {type(value).__name__}")
    return value


def _sampling(name: str, raw: Any) -> tuple[tuple[str, float | int], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise _bad(name, "sampling", "must be a table")
    out: list[tuple[str, float | int]] = []
    for key, value in raw.items():
        typ = SAMPLING_FLAGS.get(key)
        if typ is None:
            raise _bad(name, f"sampling.{key}", f"is not one of {', '.join(SAMPLING_FLAGS)}")
        ok = isinstance(value, int) if typ is int else isinstance(value, int | float)
        if not ok or isinstance(value, bool):
            raise _bad(name, f"sampling.{key}", f"must be a {typ.__name__}")
        out.append((key, typ(value)))
    return tuple(out)


def parse_entry(name: str, raw: Any) -> CatalogEntry:
    """Validate one `[models.NAME]` table."""
    if not ALIAS_RE.match(name):
        raise _bad(name, "name", "must be lower-case letters, digits, '.', '_' or '-'")
    if not isinstance(raw, dict):
        raise _bad(name, "name", "must be a table")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise _bad(name, unknown[0], "is not a known field")
    description = _opt(name, raw, "description", str)
    if not description:
        raise _bad(name, "description", "is required")
    repo, quant, file = (_opt(name, raw, f, str) for f in ("repo", "quant", "file"))
    embedded = _opt(name, raw, "embedded", str)
    if embedded is None and repo is None:
        raise _bad(name, "repo", "is required (or 'embedded')")
    if quant is not None and file is not None:
        raise _bad(name, "file", "and 'quant' exclude each other")
    try:
        if repo is not None:
            check_repo_id(repo)
        if file is not None:
            check_repo_file(file)
        if quant is not None:
            check_quant(quant)
        if embedded is not None and len(check_repo_file(embedded).split("/")) != 2:
            raise ModelError("must be PACKAGE/FILE")
    except ModelError as e:
        raise _bad(name, "repo/file/quant/embedded", f"is invalid: {e.message}") from e
    context = _opt(name, raw, "context", int)
    if context is not None and not 0 < context <= 1 << 24:
        raise _bad(name, "context", "must be between 1 and 16M tokens")
    kwargs = _opt(name, raw, "chat-template-kwargs", dict)
    return CatalogEntry(
        name=name,
        description=description,
        repo=repo,
        quant=quant,
        file=file,
        embedded=embedded,
        install=_opt(name, raw, "install", str),
        context=context,
        mmproj=bool(_opt(name, raw, "mmproj", bool)),
        sampling=_sampling(name, raw.get("sampling")),
        template_kwargs=None if kwargs is None else json.dumps(kwargs, separators=(",", ":")),
    )


def parse_catalog(text: str, origin: str = "catalog.toml") -> dict[str, CatalogEntry]:
    """Parse and validate a whole catalog document."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ModelError(f"{origin} is not valid TOML: {e}", "fix vmctl's data/catalog.toml") from e
    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        raise ModelError(f"{origin} has no [models.NAME] tables", "fix vmctl's data/catalog.toml")
    return {name: parse_entry(name, raw) for name, raw in models.items()}


@functools.cache
def load_catalog(path: Path | None = None) -> dict[str, CatalogEntry]:
    """The packaged catalog (or `path`), validated; cached per path."""
    if path is None:
        text = paths.data_text("catalog.toml")
        return parse_catalog(text)
    return parse_catalog(path.read_text("utf-8"), str(path))


def lookup(name: str) -> CatalogEntry | None:
    return load_catalog().get(name.lower())


def close_matches(name: str) -> list[str]:
    """Catalog names resembling `name`, for "did you mean" messages."""
    names = list(load_catalog())
    found = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.5)
    return found or [n for n in names if name.lower() in n][:3]
