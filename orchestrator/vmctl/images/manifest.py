"""Guest images as the boot path sees them: a manifest and the files it names.

An image builder (vmctl's micro builder, the Nix flake) writes a
`vmctl-image/1` manifest; the host reads only that, never store paths or
build output. docs/guest-contract.md, "Image manifest", is the format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmctl import contract as guest_contract
from vmctl.errors import VMError

FORMAT = "vmctl-image/1"
CONTRACT = int(guest_contract.raw()["version"])  # an image must speak this host's contract
_KEYS = {
    "format",
    "name",
    "system",
    "kernel",
    "initrd",
    "cmdline",
    "shares",
    "contract",
    "features",
    "transports",
}
_SYSTEMS = {"x86_64-linux", "aarch64-linux"}
_SHARE_KEYS = {"tag", "path", "readonly"}


@dataclass(frozen=True)
class Share:
    """A host folder the image needs (read-only shares are never writable)."""

    tag: str
    path: Path
    readonly: bool = True


@dataclass(frozen=True)
class ImageManifest:
    """A bootable guest: kernel, initrd, command line, extra shares."""

    path: Path
    name: str
    system: str
    kernel: Path
    initrd: Path
    cmdline: str
    shares: tuple[Share, ...] = ()
    contract: int = CONTRACT
    features: tuple[str, ...] = field(default_factory=tuple)
    #: Workspace transports its guest can mount (guest contract); 9p when unsaid.
    transports: tuple[str, ...] = ("9p",)

    def to_json(self) -> dict[str, Any]:
        """The manifest with absolute paths, for `--json` output."""
        return {
            "format": FORMAT,
            "manifest": str(self.path),
            "name": self.name,
            "system": self.system,
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "cmdline": self.cmdline,
            "shares": [
                {"tag": s.tag, "path": str(s.path), "readonly": s.readonly} for s in self.shares
            ],
            "contract": self.contract,
            "features": list(self.features),
            "transports": list(self.transports),
        }


def _bad(path: Path, what: str) -> VMError:
    return VMError(
        f"invalid image manifest {path}: {what}",
        "rebuild the image (`vmctl image build micro --force`) or fix the manifest",
    )


def _str(data: dict[str, Any], key: str, path: Path) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(path, f"{key!r} must be a non-empty string")
    return value


def _file(base: Path, rel: str, key: str, path: Path) -> Path:
    resolved = (base / rel).resolve()
    if not resolved.is_file():
        raise VMError(
            f"image {path}: {key} file {resolved} is missing",
            "rebuild the image (`vmctl image build micro --force`)",
        )
    return resolved


def _shares(data: dict[str, Any], base: Path, path: Path) -> tuple[Share, ...]:
    raw = data.get("shares", [])
    if not isinstance(raw, list):
        raise _bad(path, "'shares' must be a list")
    shares: list[Share] = []
    for item in raw:
        if not isinstance(item, dict) or set(item) - _SHARE_KEYS:
            raise _bad(path, f"share {item!r} must have only {sorted(_SHARE_KEYS)}")
        tag = _str(item, "tag", path)
        if tag == "workspace" or not tag.replace("-", "").replace("_", "").isalnum():
            raise _bad(path, f"share tag {tag!r} is reserved or not [A-Za-z0-9_-]")
        readonly = item.get("readonly", True)
        if not isinstance(readonly, bool):
            raise _bad(path, f"share {tag!r}: 'readonly' must be true or false")
        folder = (base / _str(item, "path", path)).resolve()
        if not folder.is_dir():
            raise VMError(
                f"image {path}: share {tag!r} folder {folder} is missing",
                "rebuild the image (`vmctl image build micro --force`)",
            )
        shares.append(Share(tag, folder, readonly))
    return tuple(shares)


def load_manifest(path: Path) -> ImageManifest:
    """Read and check a manifest; relative paths are resolved against its folder."""
    path = Path(path).expanduser().absolute()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise VMError(
            f"no image manifest at {path}", "give a manifest path, micro or nixos"
        ) from None
    except (OSError, ValueError) as e:
        raise _bad(path, f"not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise _bad(path, "not a JSON object")
    if data.get("format") != FORMAT:
        raise _bad(path, f"format {data.get('format')!r} is not {FORMAT!r}")
    unknown = set(data) - _KEYS
    if unknown:
        raise _bad(path, f"unknown keys {sorted(unknown)}")
    if data.get("contract") != CONTRACT:
        raise _bad(path, f"contract {data.get('contract')!r} is not {CONTRACT}")
    system = _str(data, "system", path)
    if system not in _SYSTEMS:
        raise _bad(path, f"system {system!r} is not one of {sorted(_SYSTEMS)}")
    features = data.get("features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise _bad(path, "'features' must be a list of strings")
    transports = data.get("transports", ["9p"])
    known = guest_contract.transports()
    if not isinstance(transports, list) or not all(t in known for t in transports):
        raise _bad(path, f"'transports' must be a list of {sorted(known)}")
    base = path.parent
    return ImageManifest(
        path=path,
        name=_str(data, "name", path),
        system=system,
        kernel=_file(base, _str(data, "kernel", path), "kernel", path),
        initrd=_file(base, _str(data, "initrd", path), "initrd", path),
        cmdline=_str(data, "cmdline", path),
        shares=_shares(data, base, path),
        features=tuple(features),
        transports=tuple(transports),
    )


def write_manifest(folder: Path, fields: dict[str, Any]) -> Path:
    """Write `manifest.json` in `folder` (atomically) and return its path."""
    data = {"format": FORMAT, "contract": CONTRACT, **fields}
    target = folder / "manifest.json"
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(target)
    return target
