"""The `vmctl` command line: thin verbs over library modules.

Each verb group lives in its own file and registers itself on `app`. This
file owns the one place where a `VmctlError` becomes a red line and a hint
instead of a traceback.
"""

from __future__ import annotations

import sys

import typer

from vmctl import __version__, ui
from vmctl.errors import VmctlError

app = typer.Typer(
    name="vmctl",
    help="Run coding agents against local models without trusting either.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"vmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """Sandboxed local models (`serve`), ephemeral agent VMs (`up`), sandboxed clients (`run`)."""


_passthrough: list[str] = []


def passthrough() -> list[str]:
    """Arguments after the first `--`, verbatim (for llama-server, QEMU, a client).

    They are split off before click parses anything, so an optional
    positional argument can never swallow them.
    """
    return list(_passthrough)


def _split(argv: list[str]) -> list[str]:
    if "--" in argv:
        i = argv.index("--")
        _passthrough[:] = argv[i + 1 :]
        return argv[:i]
    _passthrough.clear()
    return argv


def _register() -> None:
    # Imported for their side effect of adding verbs to `app`.
    from vmctl.cli import common, doctor, image, models, policy, run, sandbox, serve, vm  # noqa: F401
    from vmctl.cli import review as _review  # noqa: F401


def report(e: VmctlError) -> None:
    """Render a user-fixable error: one line, then details and a hint."""
    ui.err.print(f"[bold red]error:[/] {e.message}", markup=True, highlight=False)
    if e.details:
        ui.err.print(e.details, markup=False, highlight=False)
    if e.hint:
        ui.err.print(f"[cyan]hint:[/] {e.hint}", markup=True, highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning `VmctlError` into one clear line."""
    from typer._click.exceptions import ClickException

    _register()
    args = _split(list(sys.argv[1:] if argv is None else argv))
    try:
        rc = app(args=args, prog_name="vmctl", standalone_mode=False)
    except VmctlError as e:
        report(e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        ui.err.print("interrupted")
        sys.exit(130)
    except typer.Abort:
        sys.exit(130)
    except ClickException as e:  # usage errors: click's own one-line message
        e.show()
        sys.exit(e.exit_code)
    # With standalone_mode=False click returns typer.Exit's code instead of exiting.
    if isinstance(rc, int) and rc != 0:
        sys.exit(rc)
