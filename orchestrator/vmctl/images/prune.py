"""`vmctl image prune`: the cached images this vmctl would never use again.

Every change to the guest side (init, exec agent, contract, an agent's
version, the host's kernel or busybox) builds a new micro image beside the
old ones, about 100 MB each, and the agent installs they share stay too.
Like `docker image prune` or `limactl prune`, this removes what is stale:

- a micro image whose own key (vmctl.images.micro.own_key) is not the one
  this vmctl computes for its agents, or an older one of two with the same
  key (`vmctl up` always takes the newest), or a folder a failed build left;
- an agent install no kept image uses and this vmctl does not pin;
- an unpacked kernel package no kept image was built from.

While any guest runs, agent installs stay: a running guest reads its
agents from them (9p). Image files are safe to remove: QEMU read its
kernel and initrd when it started.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmctl import paths
from vmctl.images import micro, micro_agents


@dataclass
class Plan:
    """What prune removes, and how many bytes that frees."""

    images: list[Path] = field(default_factory=list)
    agents: list[Path] = field(default_factory=list)
    kernels: list[Path] = field(default_factory=list)
    size: int = 0  # bytes, measured when planned

    def all(self) -> list[Path]:
        return [*self.images, *self.agents, *self.kernels]

    def to_json(self) -> dict[str, object]:
        return {
            "images": [str(p) for p in self.images],
            "agents": [str(p) for p in self.agents],
            "kernels": [str(p) for p in self.kernels],
            "bytes": self.size,
        }


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def _inputs(folder: Path) -> tuple[tuple[str, ...], str, dict[str, object]] | None:
    """(agents, own key, build inputs) of a built micro image; None if unreadable."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        inputs = json.loads((folder / "inputs.json").read_text())
        stamp = (folder / "own-key").read_text().strip()
    except (OSError, ValueError):
        return None
    features = manifest.get("features") if isinstance(manifest, dict) else None
    if not isinstance(features, list) or not isinstance(inputs, dict):
        return None
    return tuple(str(f) for f in features), stamp, inputs


def plan(guests_running: bool) -> Plan:
    """What is stale in the image cache now (nothing is removed)."""
    found = Plan()
    newest: dict[str, tuple[float, Path, dict[str, object]]] = {}
    root = paths.images_dir()
    for folder in sorted(root.glob("micro-*")):
        if not folder.is_dir():
            continue
        read = _inputs(folder)
        try:
            current = read is not None and read[1] == micro.own_key(read[0])
        except Exception:  # an agent this vmctl no longer knows
            current = False
        if read is None or not current:
            found.images.append(folder)
            continue
        mtime = (folder / "manifest.json").stat().st_mtime
        before = newest.get(read[1])
        if before is not None and before[0] >= mtime:
            found.images.append(folder)
            continue
        if before is not None:
            found.images.append(before[1])
        newest[read[1]] = (mtime, folder, read[2])
    stale_after = time.time() - 3600
    found.images += [
        d for d in sorted(root.glob(".micro-*")) if d.is_dir() and d.stat().st_mtime < stale_after
    ]
    kept = [inputs for _, _, inputs in newest.values()]
    if not guests_running:
        used = {a.folder().name for a in micro_agents.AGENTS.values()}
        for inputs in kept:
            agents = inputs.get("agents")
            if isinstance(agents, dict):
                used |= {f"{name}-{version}" for name, version in agents.items()}
        agents_dir = paths.image_agents_dir()
        if agents_dir.is_dir():
            found.agents = sorted(p for p in agents_dir.iterdir() if p.name not in used)
    kernels: set[str] = set()
    for inputs in kept:
        kernel = inputs.get("kernel")
        if isinstance(kernel, list) and len(kernel) >= 2:
            kernels.add(f"{kernel[0]}_{kernel[1]}")
    if paths.kernels_dir().is_dir():
        found.kernels = sorted(p for p in paths.kernels_dir().iterdir() if p.name not in kernels)
    found.size = sum(_size(p) for p in found.all())
    return found


def remove(found: Plan) -> None:
    """Remove what `plan` found; a path already gone is fine."""
    for path in found.all():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


#: A fresh build mentions `vmctl image prune` once what it would free passes this.
HINT_BYTES = 500_000_000


def hint(min_bytes: int = HINT_BYTES) -> str | None:
    """After a build: one line naming what prune would free, if it is worth a line.

    Agent installs are left out (a running guest may read them), so the
    figure is what prune frees at least.
    """
    try:
        found = plan(guests_running=True)
    except OSError:  # a folder going while it is measured (a prune beside it): no hint
        return None
    if found.size < min_bytes:
        return None
    return (
        f"the image cache also holds {len(found.images)} older images and "
        f"{len(found.kernels)} kernels ({found.size / 1e6:.0f} MB): "
        "`vmctl image prune` removes them"
    )
