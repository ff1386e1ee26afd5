"""`vmctl diff`, `vmctl apply`: review a `--review` guest's changes, thinly."""

from __future__ import annotations

import json

import typer

from vmctl.cli import app
from vmctl.errors import VmctlError


@app.command()
def diff(
    name: str = typer.Argument(..., help="Instance started with --review."),
    paths: list[str] = typer.Argument(None, help="Only these paths (workspace-relative)."),
    stat: bool = typer.Option(False, "--stat", help="One line per changed path."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """What the agent changed in its review copy: text diffs, modes, new and deleted files."""
    from vmctl.review import changes, snapshot

    review = snapshot.load(name)
    found = changes.changes(review, paths or [])
    if as_json:
        out = []
        for c in found:
            item = c.to_json()
            if not stat:
                item["diff"] = changes.unified(review, c)
            out.append(item)
        print(json.dumps({"name": name, "source": str(review.source), "changes": out}, indent=2))
        return
    if not found:
        print(f"no changes in {name}'s review copy")
        return
    for c in found:
        print(changes.stat_line(c) if stat else changes.unified(review, c))


@app.command("apply")
def apply_(
    name: str = typer.Argument(..., help="Instance started with --review."),
    paths: list[str] = typer.Argument(None, help="Only these paths (workspace-relative)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Land the agent's changes where your files still match the snapshot; list conflicts."""
    from vmctl.review import land, snapshot

    review = snapshot.load(name)
    out = land.apply(review, paths or [])
    if as_json:
        print(json.dumps(out.to_json(), indent=2))
    else:
        for p in out.applied:
            print(f"applied   {p}")
        for p, why in out.conflicts:
            print(f"conflict  {p}: {why}")
        for p, why in out.refused:
            print(f"refused   {p}: {why}")
        for note in out.notes:
            print(f"note      {note}")
        if not (out.applied or out.conflicts or out.refused):
            print("nothing to apply")
    if out.conflicts:
        raise VmctlError(
            f"{len(out.conflicts)} change(s) not applied: your files changed since the snapshot",
            f"compare with `vmctl diff {name} PATH`, then resolve by hand",
        )
