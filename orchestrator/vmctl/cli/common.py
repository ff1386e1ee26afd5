"""`ls`, `logs`, `stop`, `status`, `rm`: verbs that work on servers and guests alike."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from vmctl import inventory, paths, ui
from vmctl.errors import NotFoundError
from vmctl.events import safe
from vmctl.serve import server
from vmctl.vm.instance import list_instances

verbs = typer.Typer()


@verbs.command("ls")
def ls(
    as_json: bool = typer.Option(False, "--json", help="One JSON object for scripts."),
    all_: bool = typer.Option(False, "--all", "-a", help="Include stopped servers and guests."),
) -> None:
    """List model servers and guest instances (dead ones are reaped on the way)."""
    servers = server.list_servers(include_stopped=all_)
    instances = [i for i in list_instances() if i.running or all_]
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
        pid = str(i.pid) if i.running else ""
        policy = f" policy={i.policy}" if i.policy else ""
        table.add_row("vm", i.name, i.state, f"net={i.net}{policy}", i.workspace, pid)
    if not servers and not instances:
        print("nothing running (start a model with `vmctl serve`, a guest with `vmctl up`)")
        return
    Console().print(table)


def _log_files(name: str, console: bool) -> list[Path]:
    """The audit log of a server or instance called `name` (or its console log)."""
    found: list[Path] = []
    sp = paths.server(name)
    ip = paths.instance(name)
    candidates = [ip.console_log] if console else [sp.audit, ip.audit]
    found = [path for path in candidates if path.exists()]
    if not found:
        raise NotFoundError(f"no logs for {name!r}", "see `vmctl ls --all`")
    return found


def _render(line: str, raw: bool) -> str:
    if raw:
        return line.rstrip("\n")
    try:
        r = json.loads(line)
    except ValueError:
        return line.rstrip("\n")
    if isinstance(r, dict) and "target" in r and "method" not in r:
        request = r.get("request") or ""
        when = r.get("time", "")
        if isinstance(when, int | float):
            when = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
        return (
            f"{when} {r.get('instance', '')} -> {r['target']} {request} "
            f"{r.get('error', '')}"
            f"in={r.get('bytes_in', 0)} out={r.get('bytes_out', 0)} {r.get('duration_s', '')}s"
        )
    if not isinstance(r, dict) or "method" not in r:
        return json.dumps(r)
    tokens = ""
    if "prompt_tokens" in r or "completion_tokens" in r:
        tokens = f" tokens={r.get('prompt_tokens', '?')}+{r.get('completion_tokens', '?')}"
    return (
        f"{r.get('time', '')} {r.get('peer', '')} {r['method']} {r.get('path', '')} "
        f"{r.get('status', '')} in={r.get('bytes_in', 0)} out={r.get('bytes_out', 0)} "
        f"{r.get('duration_ms', 0)}ms{tokens}"
    )


@verbs.command()
def logs(
    name: str = typer.Argument(..., help="Server or instance name."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    as_json: bool = typer.Option(False, "--json", help="Raw JSON lines."),
    console: bool = typer.Option(False, "--console", help="A guest's serial console log."),
) -> None:
    """Show the audit log of a server (one line per request) or a guest (one per connection)."""
    files = _log_files(name, console)
    handles = [f.open(encoding="utf-8", errors="replace") for f in files]
    try:
        for h in handles:
            for line in h:
                print(_render(line, as_json), flush=True)
        while follow:
            time.sleep(0.3)
            for h in handles:
                for line in h:
                    print(_render(line, as_json), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        for h in handles:
            h.close()


@verbs.command()
def stop(name: str = typer.Argument(..., help="A server or guest (see `vmctl ls`).")) -> None:
    """Stop a server (llama-server, gateway) or a guest (powerdown, quit, kill)."""
    with ui.step(f"stopping {name}"):
        inventory.stop(name)
    print(f"stopped {name}")


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
        keys = _SERVER_KEYS if data["kind"] == "server" else _GUEST_KEYS
        for key in keys:
            value = data.get(key)
            if key == "review" and value is None:
                continue
            if key == "mirror" and isinstance(value, dict):
                value = _mirror_line(value)
            print(f"{key:15} {', '.join(value) if isinstance(value, list) else value}")


def _mirror_line(m: dict[str, Any]) -> str:
    if m["state"] == "off":
        return f"off ({m['why']})"
    live = ", ".join(f"127.0.0.1:{p}" for p in m["live"]) or "no ports yet"
    skipped = "; ".join(f"{p} skipped: {safe(why)}" for p, why in m["skipped"].items())
    return f"on: {live}" + (f" ({skipped})" if skipped else "")


_SERVER_KEYS = ("kind", "name", "state", "pid", "url", "alias", "model", "sandbox", "audit", "log")
_GUEST_KEYS = (
    "kind", "name", "state", "pid", "uptime_s", "net", "policy", "model_endpoint", "forwards",
    "review", "mirror", "workspace", "console_log",
)  # fmt: skip


@verbs.command()
def rm(name: str = typer.Argument(..., help="A stopped server or guest.")) -> None:
    """Remove a stopped server's or persistent guest's folder (logs included)."""
    inventory.remove(name)
    print(f"removed {name}")
