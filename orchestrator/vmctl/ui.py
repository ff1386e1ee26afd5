"""Progress and messages on stderr, so stdout stays for results (`--json`).

Library modules report long phases through `step()` and `info()`; the CLI
decides whether anyone sees them (`quiet()` for `--json` and tests).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)
_forced_quiet = False
_verbose = False


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
        err.print(message)


def debug(message: str) -> None:
    """Shown only under `-v`."""
    if _verbose and not is_quiet():
        err.print(f"[dim]{message}[/]")


def warn(message: str) -> None:
    """Warnings are shown even when quiet: they change what the user gets."""
    err.print(f"[yellow]warning:[/] {message}")


@contextlib.contextmanager
def step(message: str) -> Iterator[None]:
    """Log a timed phase: `message ...` then `ready in 4.2 s`."""
    start = time.monotonic()
    if not is_quiet():
        err.print(f"{message} ...")
    try:
        yield
    except BaseException:
        if not is_quiet():
            err.print(f"[red]{message}: failed after {time.monotonic() - start:.1f} s[/]")
        raise
    if not is_quiet():
        err.print(f"[dim]{message}: done in {time.monotonic() - start:.1f} s[/]")


def tty() -> bool:
    return sys.stderr.isatty() and not is_quiet()
