"""`vmctl ls` and `vmctl logs`: verbs that span servers and guest instances."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
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


@app.command()
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
