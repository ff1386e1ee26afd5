"""Which image a guest boots: `micro` (built here), `nixos` (the flake) or a manifest.

Kept apart from the manifest reader so the builders can write manifests
without importing the chooser that calls them.
"""

from __future__ import annotations

from pathlib import Path

from vmctl import ui
from vmctl.errors import VMError
from vmctl.images import micro, nixos
from vmctl.images.manifest import ImageManifest, load_manifest


def choose_image(
    image: str,
    with_agents: tuple[str, ...] | None = None,
    *,
    flake: str | None = None,
    config: str | None = None,
) -> tuple[ImageManifest, str]:
    """`--image` resolved, `auto` meaning nixos where Nix can build it, else micro.

    Without `--image`, Nix missing or offline is no error: the micro image is
    the main path here, and why nixos was not used is one line under `-v`.
    """
    if image == "auto":
        reason = nixos.nix_probe(flake)
        image = "micro" if reason else "nixos"
        ui.info(f"image: {image}" + ("" if reason else " (Nix can build it here)"))
        if reason:
            ui.debug(f"image: not nixos: {reason}")
    return resolve_image(image, with_agents, flake=flake, config=config), image


def resolve_image(
    name_or_path: str,
    with_agents: tuple[str, ...] | None = None,
    *,
    flake: str | None = None,
    config: str | None = None,
) -> ImageManifest:
    """`micro` (built if needed), `nixos` (from the flake), or a manifest path.

    For `micro` without `with_agents`, an already built image with opencode
    is preferred, then one without; only when neither exists is a plain one
    built (`vmctl image build micro --with opencode` adds the agent).
    """
    if name_or_path == "micro":
        wanted = [with_agents] if with_agents is not None else [("opencode",), ()]
        for agents in wanted:
            built = micro.find_built(agents)
            if built is not None:
                return load_manifest(built)
        manifest = load_manifest(micro.build_micro(wanted[-1]))
        from vmctl.images import prune

        if note := prune.hint():
            ui.info(note)
        return manifest
    if name_or_path == "nixos":
        return load_manifest(Path(nixos.build_manifest(flake, config)))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "manifest.json"
    if not path.exists() and "/" not in name_or_path and not name_or_path.endswith(".json"):
        raise VMError(f"unknown image {name_or_path!r}", "use micro, nixos or a manifest path")
    return load_manifest(path)
