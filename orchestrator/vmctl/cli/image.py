"""`vmctl image build|show|prune`: build the micro image, inspect a manifest, clean the cache."""

from __future__ import annotations

import json

import typer

from vmctl import ui
from vmctl.errors import ConfigError
from vmctl.images import micro
from vmctl.images import prune as pruning
from vmctl.images.choose import resolve_image
from vmctl.images.manifest import load_manifest
from vmctl.vm.instance import list_instances

group = typer.Typer(help="Build and inspect guest images.", no_args_is_help=True)


@group.command("build")
def build(
    name: str = typer.Argument(..., help="The image to build: micro."),
    with_agents: list[str] = typer.Option(
        [],
        "--with",
        help="Agents to carry in the image (opencode, claude, codex, llm).",
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a cached image matches."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Build an image (cached by the content of its inputs); prints its manifest path."""
    if name != "micro":
        raise ConfigError(
            f"vmctl cannot build image {name!r}",
            "only micro is built here (nixos comes from the flake)",
        )
    if as_json:
        ui.quiet()
    manifest = load_manifest(micro.build_micro(tuple(with_agents), force=force))
    print(json.dumps(manifest.to_json(), indent=2) if as_json else manifest.path)
    if note := pruning.hint():
        ui.info(note)


@group.command("show")
def show(
    name: str = typer.Argument(..., help="micro, nixos or a manifest path."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show an image's manifest (micro is built first if needed)."""
    if as_json:
        ui.quiet()
    manifest = resolve_image(name)
    if as_json:
        print(json.dumps(manifest.to_json(), indent=2))
        return
    for key, value in manifest.to_json().items():
        if key == "shares":
            value = ", ".join(
                f"{s['tag']}={s['path']}{' (ro)' if s['readonly'] else ''}" for s in value
            )
        elif key == "features":
            value = ", ".join(value) or "-"
        print(f"{key:10} {value}")


@group.command("prune")
def prune(
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; remove nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print what was removed as JSON."),
) -> None:
    """Remove cached images, agent installs and kernels this vmctl would not use again."""
    running = any(i.running for i in list_instances())
    found = pruning.plan(guests_running=running)
    if not dry_run:
        pruning.remove(found)
    if as_json:
        print(json.dumps(found.to_json() | {"dry_run": dry_run}))
        return
    verb = "would remove" if dry_run else "removed"
    print(
        f"{verb} {len(found.images)} images, {len(found.agents)} agent installs, "
        f"{len(found.kernels)} kernels: {found.size / 1e6:.0f} MB"
    )
    if running and not dry_run:
        print("agent installs were kept: a guest is running (run prune again once it stops)")
