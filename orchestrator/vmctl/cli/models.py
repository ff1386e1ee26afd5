"""`vmctl pull` and `vmctl models`: thin verbs over `vmctl.models.fetch`."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from vmctl import ui
from vmctl.cli import app
from vmctl.models import fetch


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


@app.command()
def pull(
    model: str = typer.Argument(..., help="Catalog alias, org/repo:QUANT, org/repo:FILE.gguf."),
    no_mmproj: bool = typer.Option(False, "--no-mmproj", help="Skip the vision projector."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Download a model into the Hugging Face cache (resuming an interrupted pull), verified."""
    if as_json:
        ui.quiet()
    local = fetch.resolve_model(model, pull=True, mmproj=not no_mmproj)
    if as_json:
        print(json.dumps(local.to_json(), indent=2))
        return
    out = Console(highlight=False)
    out.print(f"[green]ready:[/] {local.alias}  ({local.source})")
    for part in local.parts:
        out.print(f"  model   {part}")
    if local.mmproj is not None:
        out.print(f"  mmproj  {local.mmproj}")


@app.command("models")
def models(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List the catalog and what is cached, with sizes."""
    rows = fetch.cached_models()
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return
    table = Table(box=None, pad_edge=False)
    cells = [(r.name, "yes" if r.cached else "no", _size(r.size), r.source) for r in rows]
    for i, col in enumerate(("MODEL", "CACHED", "SIZE", "SOURCE")):
        table.add_column(col, no_wrap=True, min_width=max(len(c[i]) for c in cells), ratio=None)
    table.add_column("DESCRIPTION", overflow="fold", ratio=1)
    for r, c in zip(rows, cells, strict=True):
        table.add_row(*c, r.description, style=None if r.cached else "dim")
    Console().print(table)
