"""`vmctl policy allow|deny|rm|ls|log`: egress rules by destination, thinly."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vmctl import egress, paths
from vmctl.errors import ConfigError
from vmctl.events import safe

group = typer.Typer(
    help="Egress rules (by host, pattern or CIDR and port) and the log of attempts.",
    no_args_is_help=True,
)

FOR_HELP = "A guest or client (llm, opencode, claude, codex, shell) name; default: every one."
JSON_HELP = "The rule as JSON, for scripts."


def _scope(name: str | None, known: bool = False) -> str | None:
    """`--for NAME`: a guest instance, a client, or a name `known` to the caller; else one line.

    `known`: the rules or the log already name it (a guest since removed
    keeps its rules and its attempts until they are removed).
    """
    if name is None:
        return None
    from vmctl.clients.registry import CLIENTS

    paths.check_name(name, "--for name")
    if known or name in CLIENTS or paths.instance(name).meta.exists():
        return name
    raise ConfigError(
        f"--for {name!r} is neither a guest nor a client",
        f"see `vmctl ls` for guests; clients are {', '.join(CLIENTS)}",
    )


def _said(what: str, rule: egress.Rule, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"result": what, "rule": egress.describe([rule])[0]}, indent=2))
    else:
        print(f"{what}: {rule.label}")


def _add(action: str, target: str, for_: str | None, as_json: bool) -> None:
    rule = egress.parse_rule(action, target, _scope(for_))
    added = egress.add_rule(rule)
    _said("added" if added else "already there", rule, as_json)


@group.command("allow")
def allow(
    target: str = typer.Argument(..., help="HOST[:PORT], *.DOMAIN[:PORT] or CIDR:PORT."),
    for_: str | None = typer.Option(None, "--for", help=FOR_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Allow a destination (a deny for the same destination still wins)."""
    _add("allow", target, for_, as_json)


@group.command("deny")
def deny(
    target: str = typer.Argument(..., help="HOST[:PORT], *.DOMAIN[:PORT] or CIDR:PORT."),
    for_: str | None = typer.Option(None, "--for", help=FOR_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Deny a destination; deny wins over every allow and every preset."""
    _add("deny", target, for_, as_json)


@group.command("rm")
def rm(
    target: str = typer.Argument(..., help="The rule's destination, as `policy ls` shows it."),
    for_: str | None = typer.Option(None, "--for", help=FOR_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Remove the rule for a destination (global, or the one `--for NAME`)."""
    scoped = {r.scope for r in egress.load_rules()}
    scope = _scope(for_, known=for_ in scoped)
    _said("removed", egress.remove_rule(target, scope), as_json)


@group.command("ls")
def ls(
    for_: str | None = typer.Option(None, "--for", help="Only the rules that apply to NAME."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The stored rules (global and per name) and the presets."""
    rules = egress.load_rules()
    if for_ is not None:
        scope = _scope(for_, known=any(r.scope == for_ for r in rules))
        rules = [r for r in rules if r.scope in (None, scope)]
    presets = {
        p.name: {"description": p.description, "allow": [r.target for r in p.rules]}
        for p in egress.presets().values()
    }
    if as_json:
        print(json.dumps({"rules": egress.describe(rules), "presets": presets}, indent=2))
        return
    for r in rules:
        print(r.label)
    if not rules:
        print("no rules (the preset alone decides)")
    for name, p in presets.items():
        print(f"preset {name}: {p['description']} ({len(p['allow'])} hosts)")


@group.command("log")
def log(
    for_: str | None = typer.Option(None, "--for", help="Only NAME's attempts."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Egress attempts, host by host: counts, first and last seen, decision, rule."""
    from vmctl.egress_log import aggregate, egress_events

    attempts = egress_events(for_)
    _scope(for_, known=bool(attempts))
    rows = aggregate(attempts)
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return
    if not rows:
        print("no egress attempts logged")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("WHO", "HOST", "PORT", "DECISION", "COUNT", "FIRST", "LAST", "RULE"):
        table.add_column(col)
    for r in rows:
        cells = (r.who, r.host, r.port, r.decision, r.count, r.first, r.last, r.rule)
        table.add_row(*(escape(safe(c)) for c in cells))
    Console(highlight=False, soft_wrap=True).print(table)
