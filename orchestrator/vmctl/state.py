"""Strict reading and atomic writing of vmctl's JSON state files.

State files sit in folders a sandboxed agent might one day reach, so they
are data only: JSON, parsed strictly, never sourced or executed, written
atomically with mode 0600.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

MAX_STATE_BYTES = 1 << 20


class StateError(ValueError):
    """A state file is missing, oversized or malformed."""


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` atomically, mode 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, required: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """Read a JSON object and check that each required key has its type."""
    try:
        if path.is_symlink():
            raise StateError(f"{path} is a symlink")
        raw = path.read_bytes()
    except OSError as e:
        raise StateError(f"{path}: {e.strerror}") from e
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"{path} is too large")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise StateError(f"{path} does not hold a JSON object")
    for key, typ in required.items():
        value = data.get(key)
        if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
            raise StateError(f"{path}: field {key!r} is missing or has the wrong type")
    return data
