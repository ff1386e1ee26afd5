"""`ls`, `logs`, `events`, `stop`, `status`, `rm`: verbs that work on servers and guests alike."""

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

from vmctl import events, inventory, paths, ui
from vmctl.errors import ConfigError, NotFoundError, VmctlError
from vmctl.events import safe
from vmctl.serve import server
from vmctl.sidecars import floor as floor_of
from vmctl.vm.instance import list_instances

verbs = typer.Typer()


@verbs.command("ls")
def ls(
    as_json: bool = typer.Option(False, "--json", help="One JSON object for scripts."),
    all_: bool = typer.Option(
        False, "--all", "-a", help="Include stopped servers and guests, and kept review copies."
    ),
) -> None:
    """List model servers and guest instances (dead ones are reaped on the way)."""
    servers = server.list_servers(include_stopped=all_)
    instances = [i for i in list_instances() if i.running or all_]
    reviews = inventory.kept_reviews() if all_ else []
    if as_json:
        out = {
            "servers": [s.to_json() for s in servers],
            "instances": [i.to_json() for i in instances],
            "reviews": reviews,
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
        pid = str(i.pid) if i.running else ""
        policy = f" policy={i.policy}" if i.policy else ""
        table.add_row("vm", i.name, i.state, f"net={i.net}{policy}", i.workspace, pid)
    for r in reviews:  # an ephemeral review guest's copy, its changes kept
        table.add_row("review", r["name"], "kept", f"vmctl diff {r['name']}", r["source"], "")
    if not servers and not instances and not reviews:
        print("nothing running (start a model with `vmctl serve`, a guest with `vmctl up`)")
        return
    Console().print(table)


KEEP_DAYS_ENV = "VMCTL_EVENTS_KEEP_DAYS"


def _events_dir() -> Path:
    """The events folder, pruned to the user's retention (VMCTL_EVENTS_KEEP_DAYS, 30)."""

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


@verbs.command()
def logs(
    name: str = typer.Argument(..., help="Server or instance name."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    as_json: bool = typer.Option(False, "--json", help="Raw JSON lines."),
    console: bool = typer.Option(False, "--console", help="A guest's serial console log."),
) -> None:
    """What one server or guest did: its requests, connections, lifecycle (kept until rm)."""
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


@verbs.command("events")
def events_(
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events."),
    as_json: bool = typer.Option(False, "--json", help="One JSON event per line."),
    who: str | None = typer.Option(None, "--who", help="Only events of this guest/server/client."),
    since: str | None = typer.Option(None, "--since", help="ISO time or age (10m, 2h, 7d)."),
) -> None:
    """Everything audited (requests, connections, refusals, lifecycle) in time order."""
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


@verbs.command()
def stop(
    name: str = typer.Argument(..., help="A server or guest (see `vmctl ls`)."),
    discard: bool = typer.Option(
        False, "--discard", help="Drop a --review guest's unapplied changes."
    ),
) -> None:
    """Stop a server (llama-server, gateway) or a guest (powerdown, quit, kill)."""
    # Before "stopping": an unknown name is one error, and so is a kept review
    # copy (nothing runs; its own verbs are named).
    if inventory.require(name) == ["review"]:
        raise inventory.wrong_kind(name, "guest", "stop") or VmctlError(f"{name} is not running")
    with ui.step(f"stopping {name}"):
        stopped = inventory.stop(name)
    print(f"stopped {name}")
    if "guest" in stopped:  # as `vmctl down`: a review copy is kept or dropped, and said
        from vmctl.review import snapshot  # only a guest's stop needs it

        line = snapshot.settle(name, discard)
        if line:
            print(line)


@verbs.command()
def status(
    name: str = typer.Argument(..., help="A server or guest."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """State, pid and addresses of a server or guest (a guest's from QMP)."""
    found = inventory.status(name)
    if as_json:
        print(json.dumps(found[0] if len(found) == 1 else found, indent=2))
        return
    for data in found:
        keys = {"server": _SERVER_KEYS, "review": _REVIEW_KEYS}.get(str(data["kind"]), _GUEST_KEYS)
        for key in keys:
            value = data.get(key)
            if key == "review" and value is None:
                continue
            if key == "mirror" and isinstance(value, dict):
                value = _mirror_line(value)
            if key == "disk_floor":
                value = _floor_line(value if isinstance(value, dict) else None, name)
            print(f"{key:15} {', '.join(value) if isinstance(value, list) else value}")
        notices = data.get("notices")  # what `up` warned about (tools off, ...)
        for notice in notices if isinstance(notices, list) else []:
            print(f"{'notice':15} {safe(notice)}")


def _mirror_line(m: dict[str, Any]) -> str:
    if m["state"] == "off":
        return f"off ({m['why']})"
    live = ", ".join(f"127.0.0.1:{p}" for p in m["live"]) or "no ports yet"
    skipped = "; ".join(f"{p} skipped: {safe(why)}" for p, why in m["skipped"].items())
    return f"on: {live}" + (f" ({skipped})" if skipped else "")


def _floor_line(f: dict[str, Any] | None, name: str) -> str:
    if not f:
        return "off"
    floor, free = floor_of.human(f["floor"]), floor_of.human(f["free"])
    if not f["paused"]:
        return f"{floor} ({free} free)"
    back = floor_of.human(f["floor"] + floor_of.RESUME_MARGIN)
    return (
        f"paused the guest: {free} free, under {floor}; it continues once {back} is free "
        f"(or `vmctl down {name}`)"
    )


_SERVER_KEYS = ("kind", "name", "state", "pid", "url", "alias", "model", "sandbox", "audit", "log")
_REVIEW_KEYS = ("kind", "name", "state", "review")
_GUEST_KEYS = (
    "kind", "name", "state", "pid", "uptime_s", "net", "policy", "model_endpoint", "forwards",
    "review", "mirror", "workspace", "share", "disk_floor", "console_log",
)  # fmt: skip


@verbs.command()
def rm(name: str = typer.Argument(..., help="A stopped server or guest.")) -> None:
    """Remove a stopped server's or persistent guest's folder (logs included)."""
    inventory.remove(name)
    print(f"removed {name}")
