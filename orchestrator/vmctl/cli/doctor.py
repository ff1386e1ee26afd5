"""`vmctl doctor`: report what works here and how to fix what does not."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console

from vmctl import doctor as checks

verbs = typer.Typer()


@verbs.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Machine-readable report.")) -> None:
    """Check QEMU and its accelerator, the sandbox, llama-server, nix and the models."""
    results = checks.run_checks()
    if as_json:
        print(json.dumps({"platform": sys.platform, "checks": [r.to_json() for r in results]}))
        return
    console = Console(highlight=False)
    for r in results:
        mark = "[green]ok[/]  " if r.ok else "[red]MISSING[/]"
        console.print(f"{mark} {r.name}: {r.detail}", soft_wrap=True)
        if r.fix:
            console.print(f"      [cyan]fix:[/] {r.fix}", soft_wrap=True)
