"""`vmctl ls`, `logs`, `events`, `rm`: verbs that span servers and guest instances."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from vmctl import paths
from vmctl.cli import app
from vmctl.errors import NotFoundError
from vmctl.serve import server


def _instances() -> list[Any]:
    try:
        from vmctl.vm.instance import list_instances
    except ImportError:
        return []
    return list(list_instances())


@app.command("ls")
def ls(
    as_json: bool = typer.Option(False, "--json", help="One JSON object for scripts."),
    all_: bool = typer.Option(False, "--all", "-a", help="Include stopped servers."),
) -> None:
    """List model servers and guest instances (dead ones are reaped on the way)."""
    servers = server.list_servers(include_stopped=all_)
    instances = _instances()
    if as_json:
        out = {
            "servers": [s.to_json() for s in servers],
            "instances": [i.to_json() for i in instances],
        }
        print(json.dumps(out, indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for col in ("KIND", "NAME", "STATE", "ENDPOINT / POLICY", "MODEL / WORKSPACE", "PID"):
        table.add_column(col)
    for s in servers:
        state = "running" if s.running else "stopped"
        sandbox = "" if s.sandbox else " (NO SANDBOX)"
        table.add_row("server", s.name, state, s.url + "/v1" + sandbox, s.alias, str(s.pid))
    for i in instances:
        d = i.to_json()
        table.add_row(
            "vm",
            str(d.get("name")),
            str(d.get("state", "running")),
            f"net={d.get('net', '?')}" + (f" policy={d['policy']}" if d.get("policy") else ""),
            str(d.get("workspace", "")),
            str(d.get("pid", "")),
        )
    if not servers and not instances:
        print("nothing running (start a model with `vmctl serve`, a guest with `vmctl up`)")
        return
    Console().print(table)


KEEP_DAYS_ENV = "VMCTL_EVENTS_KEEP_DAYS"


def _events_dir() -> Path:
    """The events folder, pruned to the user's retention (VMCTL_EVENTS_KEEP_DAYS, 30)."""
    from vmctl import events
    from vmctl.errors import ConfigError

    folder = paths.events_dir()
    text = os.environ.get(KEEP_DAYS_ENV, "30")
    try:
        days = float(text)
    except ValueError:
        raise ConfigError(f"{KEEP_DAYS_ENV}={text!r} is not a number of days", "e.g. 30") from None
    if days > 0:
        events.prune(folder, days)
    return folder


def _show(
    select: Callable[[Any], bool], files: Callable[[], list[Path]], follow: bool, as_json: bool
) -> None:
    """Print the selected events in time order (then new ones, with -f), escaped."""
    from vmctl import events

    def out(e: Any) -> None:
        print(e.to_json() if as_json else events.render(e), flush=True)

    for e in events.read_all(files()):
        if select(e):
            out(e)
    if follow:
        with contextlib.suppress(KeyboardInterrupt):
            for e in events.follow(files):
                if select(e):
                    out(e)


@app.command()
def logs(
    name: str = typer.Argument(..., help="Server or instance name."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    as_json: bool = typer.Option(False, "--json", help="Raw JSON lines."),
    console: bool = typer.Option(False, "--console", help="A guest's serial console log."),
) -> None:
    """What one server or guest did: its requests, connections, lifecycle (kept until rm)."""
    from vmctl import events

    paths.check_name(name)
    if console:
        log = paths.instance(name).console_log
        if not log.exists():
            raise NotFoundError(f"no console log for {name!r}", "see `vmctl ls`")
        for line in log.read_text(errors="replace").splitlines():
            print(events.safe(line))
        return
    folder = _events_dir()

    def files() -> list[Path]:  # a server's request lines are in its callers' files
        return events.all_files(folder)

    seen = any(events.about(e, name) for e in events.read_all(files()))
    if not seen and not events.name_files(folder, name):
        raise NotFoundError(f"no logs for {name!r}", "see `vmctl ls --all` or `vmctl events`")
    _show(lambda e: events.about(e, name), files, follow, as_json)


@app.command("events")
def events_(
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events."),
    as_json: bool = typer.Option(False, "--json", help="One JSON event per line."),
    who: str | None = typer.Option(None, "--who", help="Only events of this guest/server/client."),
    since: str | None = typer.Option(None, "--since", help="ISO time or age (10m, 2h, 7d)."),
) -> None:
    """Everything audited (requests, connections, refusals, lifecycle) in time order."""
    from vmctl import events
    from vmctl.errors import ConfigError

    cutoff = ""
    if since is not None:
        try:
            cutoff = events.parse_since(since)
        except ValueError as e:
            raise ConfigError(str(e), "e.g. --since 10m or --since 2026-01-01T10:00") from None
    folder = _events_dir()
    _show(
        lambda e: e.time >= cutoff and (who is None or events.about(e, who)),
        lambda: events.all_files(folder),
        follow,
        as_json,
    )


@app.command()
def rm(name: str = typer.Argument(..., help="A stopped server or instance.")) -> None:
    """Remove a stopped server's or persistent guest's folder (logs included)."""
    import shutil

    from vmctl.errors import VmctlError

    removed = []
    for root, running in _stopped_or_running(name):
        if running:
            raise VmctlError(
                f"{name} is running", f"stop it first: vmctl stop {name} / vmctl down {name}"
            )
        shutil.rmtree(root)
        removed.append(root)
    from vmctl import events

    removed += events.remove_subject(paths.events_dir(), paths.check_name(name))
    if not removed:
        raise NotFoundError(f"nothing named {name!r}", "see `vmctl ls --all`")
    print(f"removed {name}")


def _stopped_or_running(name: str) -> list[tuple[Path, bool]]:
    """(folder, running) for a server and an instance called `name`."""
    found = []
    sroot = paths.server(name).root
    if sroot.is_dir():
        info = next((s for s in server.list_servers(True) if s.name == name), None)
        found.append((sroot, bool(info and info.running)))
    iroot = paths.instance(name).root
    if iroot.is_dir():
        running = any(i.name == name and i.running for i in _instances())
        found.append((iroot, running))
    rroot = paths.review(name).root
    if rroot.is_dir():  # a --review guest's copy, kept after `down` until apply or rm
        running = any(i.name == name and i.running for i in _instances())
        found.append((rroot, running))
    return found
