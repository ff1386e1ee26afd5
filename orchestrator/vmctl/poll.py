"""One bounded wait used by every readiness check.

Readiness is a handshake (a QMP greeting, a marker, `/health`), never a
sleep; each wait has a deadline, and its last try says what it saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Timeout(Exception):
    """The condition did not hold in time; `last` is what the last try saw."""

    def __init__(self, what: str, timeout: float, last: str):
        super().__init__(f"{what}: not ready after {timeout:.0f} s ({last})")
        self.what = what
        self.last = last


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    abort: Callable[[], str | None] | None = None,
) -> T:
    """Call `check` until it returns a value other than None.

    `check` may raise to report progress: the exception text becomes the
    "last seen" of the Timeout. `abort` returns a reason to stop early
    (the process being waited for died), raised as Timeout at once.
    """
    deadline = time.monotonic() + timeout
    last = "never checked"
    while True:
        if abort is not None:
            reason = abort()
            if reason:
                raise Timeout(what, timeout, reason)
        try:
            result = check()
        except Exception as e:
            last = f"{type(e).__name__}: {e}"
        else:
            if result is not None:
                return result
            last = "not yet"
        if time.monotonic() >= deadline:
            raise Timeout(what, timeout, last)
        time.sleep(interval)
