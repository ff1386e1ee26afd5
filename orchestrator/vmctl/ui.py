"""Progress and messages on stderr, so stdout stays for results (`--json`).

Library modules report long phases through `step()` and `info()`; the CLI
decides whether anyone sees them (`quiet()` for `--json` and tests).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

_err: Console | None = None
_forced_quiet = False
_verbose = False


def console() -> Console:
    """rich's stderr console, made on first use.

    rich costs about 25 ms to import, and `vmctl up` needs it for nothing
    before its guest starts (see `_say`).
    """
    global _err
    if _err is None:
        from rich.console import Console

        _err = Console(stderr=True, highlight=False, soft_wrap=True)
    return _err


#: The styles vmctl's own lines use; rich prints them as nothing off a terminal.
_STYLES = re.compile(r"\[(?:/|dim|red|yellow|cyan|green|bold|bold red)\]")


def _colour() -> bool:
    """Whether rich would style stderr (a terminal, or FORCE_COLOR said so)."""
    return sys.stderr.isatty() or bool(os.environ.get("FORCE_COLOR"))


def _say(message: str) -> None:
    """Print a line on stderr.

    One that rich would print unchanged (no markup, no `:emoji:` code), or
    that only carries vmctl's styles where no colour is shown (a pipe, a
    log: agents and scripts), skips rich: ~25 ms of import per verb.
    """
    plain = message if _colour() else _STYLES.sub("", message)
    if "[" in plain or re.search(r":[a-z0-9_+-]+:", plain):  # rich's emoji names
        console().print(message)
    else:
        sys.stderr.write(plain + "\n")
        sys.stderr.flush()


def escape(text: str) -> str:
    """Text shown literally inside a rich markup message."""
    from rich.markup import escape

    return escape(text)


def quiet(flag: bool = True) -> None:
    global _forced_quiet
    _forced_quiet = flag


def verbose(flag: bool = True) -> None:
    """`-v`: also show `debug()` lines (why a default was chosen)."""
    global _verbose
    _verbose = flag


def is_quiet() -> bool:
    """Quiet when asked (`--json`) or when VMCTL_QUIET is set (tests, detached runs)."""
    return _forced_quiet or bool(os.environ.get("VMCTL_QUIET"))


def info(message: str) -> None:
    if not is_quiet():
        _say(message)


def debug(message: str) -> None:
    """Shown only under `-v`."""
    if _verbose and not is_quiet():
        _say(f"[dim]{message}[/]")


def warn(message: str) -> None:
    """Warnings are shown even when quiet: they change what the user gets."""
    _say(f"[yellow]warning:[/] {message}")


@contextlib.contextmanager
def step(message: str) -> Iterator[None]:
    """Log a timed phase: `message ...` then `ready in 4.2 s`."""
    start = time.monotonic()
    if not is_quiet():
        _say(f"{message} ...")
    try:
        yield
    except BaseException:
        if not is_quiet():
            _say(f"[red]{message}: failed after {time.monotonic() - start:.1f} s[/]")
        raise
    if not is_quiet():
        _say(f"[dim]{message}: done in {time.monotonic() - start:.1f} s[/]")


def tty() -> bool:
    return sys.stderr.isatty() and not is_quiet()
