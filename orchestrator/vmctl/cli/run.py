"""`vmctl run CLIENT`: a host client confined to one workspace, model-only network."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from vmctl.cli.argv import passthrough
from vmctl.clients import launch, registry
from vmctl.sidecars import floor

verbs = typer.Typer()


@verbs.command(context_settings={"help_option_names": ["-h", "--help"]})
def run(
    client: str = typer.Argument(..., help=f"One of: {', '.join(registry.CLIENTS)}."),
    workspace: Path = typer.Option(
        Path("."), "--workspace", "-w", help="The one folder it may write (default: here)."
    ),
    endpoint: str | None = typer.Option(
        None, "--endpoint", help="Model endpoint (default: the running `vmctl serve`)."
    ),
    server: str | None = typer.Option(
        None, "--server", help="The running `vmctl serve` to use (needed when several run)."
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Key of a non-vmctl endpoint (or VMCTL_API_KEY)."
    ),
    client_bin: Path | None = typer.Option(
        None, "--client-bin", help="The client's executable (default: PATH, then vmctl's tools)."
    ),
    no_sandbox: bool = typer.Option(
        False, "--no-sandbox", help="Run the client unconfined (loudly warned)."
    ),
    policy: str | None = typer.Option(
        None, "--policy", help="Egress preset through vmctl's proxy: locked | balanced | open."
    ),
    resolve: list[str] = typer.Option(
        [], "--resolve", help="HOST:ADDR: the egress proxy resolves HOST to ADDR (as curl's)."
    ),
    disk_floor: str | None = typer.Option(
        None,
        "--disk-floor",
        envvar=floor.ENV,
        help=floor.help_text("the client"),
    ),
) -> None:
    """Run llm, opencode, claude, codex or a shell against the local model, sandboxed.

    Arguments after `--` go to the client verbatim; its exit status is vmctl's.
    """
    req = launch.RunRequest(
        client=client,
        workspace=workspace,
        args=passthrough(),
        endpoint=endpoint,
        server=server,
        api_key=api_key,
        client_bin=client_bin,
        sandbox=not no_sandbox,
        policy=policy,
        resolve=tuple(resolve),
        disk_floor=None if disk_floor is None else floor.parse_size(disk_floor),
    )
    code = launch.run(req)
    sys.stdout.flush()
    # Not typer.Exit: click returns its code from a non-standalone app() call
    # and vmctl.cli.main drops it, so the client's status would be lost.
    sys.exit(code)
