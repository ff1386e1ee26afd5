"""The `vmctl` command line: thin verbs over library modules.

Each verb group lives in its own file as a small Typer of its own; this
file composes them (the verb modules never import it back), and owns the
one place where a `VmctlError` becomes a red line and a hint instead of a
traceback. Running a known verb imports only its own module: `vmctl up`
then skips the doctor, the host clients and the sandbox renderers, about
0.1 s of CPU before QEMU starts.
"""

from __future__ import annotations

import importlib
import sys

import typer
from typer._click.exceptions import ClickException

from vmctl import __version__, ui
from vmctl.cli.argv import split
from vmctl.errors import VmctlError

#: Each verb's module under vmctl.cli, in the order `vmctl --help` lists
#: them (the three paths, then the rest); tests/test_verbs.py holds this
#: table to what the modules register.
VERBS: dict[str, str] = {
    "serve": "serve",
    **dict.fromkeys(("up", "exec", "shell", "console", "down"), "vm"),
    **dict.fromkeys(("diff", "apply"), "review"),
    "run": "run",
    **dict.fromkeys(("ls", "logs", "events", "stop", "status", "rm"), "common"),
    **dict.fromkeys(("pull", "models"), "models"),
    "doctor": "doctor",
}
#: Sub-command groups: `vmctl image ...`, each its module's `group`.
GROUPS = ("image", "sandbox", "policy")


def _version(value: bool) -> None:
    if value:
        print(f"vmctl {__version__}")
        raise typer.Exit()


def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also say why each default was chosen."
    ),
) -> None:
    """Sandboxed local models (`serve`), ephemeral agent VMs (`up`), sandboxed clients (`run`)."""
    ui.verbose(verbose)


def _verb(args: list[str]) -> str | None:
    """The verb `args` run (the first word that is not an option), if vmctl knows it."""
    word = next((a for a in args if not a.startswith("-")), None)
    return word if word in VERBS or word in GROUPS else None


def compose(verb: str | None = None) -> typer.Typer:
    """The app: only `verb`'s module when given, else every verb (help, completion)."""
    app = typer.Typer(
        name="vmctl",
        help="Run coding agents against local models without trusting either.",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    wanted = {VERBS.get(verb, verb)} if verb else {*VERBS.values(), *GROUPS}
    for name in dict.fromkeys(VERBS.values()):
        if name in wanted:
            app.add_typer(importlib.import_module(f"vmctl.cli.{name}").verbs)
    for name in GROUPS:
        if name in wanted:
            app.add_typer(importlib.import_module(f"vmctl.cli.{name}").group, name=name)
    return app


def report(e: VmctlError) -> None:
    """Render a user-fixable error: one line, then details and a hint."""
    ui.console().print(f"[bold red]error:[/] {e.message}", markup=True, highlight=False)
    if e.details:
        ui.console().print(e.details, markup=False, highlight=False)
    if e.hint:
        ui.console().print(f"[cyan]hint:[/] {e.hint}", markup=True, highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning `VmctlError` into one clear line."""
    args = split(list(sys.argv[1:] if argv is None else argv))
    try:
        rc = compose(_verb(args))(args=args, prog_name="vmctl", standalone_mode=False)
    except VmctlError as e:
        report(e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        ui.console().print("interrupted")
        sys.exit(130)
    except typer.Abort:
        sys.exit(130)
    except ClickException as e:  # usage errors: click's own one-line message
        e.show()
        sys.exit(e.exit_code)
    # With standalone_mode=False click returns typer.Exit's code instead of exiting.
    if isinstance(rc, int) and rc != 0:
        sys.exit(rc)
