"""Names a model may carry: hub repo ids, files inside a repo, quant labels, aliases.

Checked before anything touches the network or the disk (hub URLs
normalise `..`, so an unchecked file part would be written outside the
cache). A leaf module: the spec parser and the catalog both check with it.
"""

from __future__ import annotations

import re

from vmctl.errors import ModelError

REPO_RE = re.compile(r"^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$")
PART_RE = re.compile(r"^[A-Za-z0-9._+-]+$")
QUANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


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
