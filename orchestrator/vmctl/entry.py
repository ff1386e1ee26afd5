"""The `vmctl` executable: a fast path for `exec`, the full CLI for the rest.

Agents and scripts call `vmctl exec NAME -- CMD` in loops, so its start-up
is most of the round trip. Importing the Typer CLI (typer, rich, aiohttp,
huggingface_hub, ...) costs about 200 ms; the exec path needs none of it,
and not even pathlib, typing, re or json (each about 8-12 ms of CPU). The
plain form `vmctl exec NAME -- CMD...` is handled here with os and two small
vmctl modules; anything else (help, flags, a guest that is not running: the
full CLI reaps and explains) goes to the full CLI, which behaves the same.
"""

from __future__ import annotations

import os
import sys

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-")
_NAME = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")


def _fail(message: str, hint: str | None, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return code


def quote_join(args: list[str]) -> str:
    """shlex.join without importing shlex (and re)."""
    return " ".join(
        a if a and set(a) <= _SAFE else "'" + a.replace("'", "'\"'\"'") + "'" for a in args
    )


def instance_dir(name: str) -> str | None:
    """vmctl.paths.instance(name).root as a string, where that needs no import.

    Mirrors paths.home() for VMCTL_HOME and Linux's default (a test holds
    the two together); None elsewhere or for a name paths would refuse.
    """
    if not (0 < len(name) <= 40 and name[0] not in "._-" and set(name) <= _NAME):
        return None
    home = os.environ.get("VMCTL_HOME")
    if not home:
        if not sys.platform.startswith("linux"):
            return None
        xdg = os.environ.get("XDG_STATE_HOME", "")
        home = os.path.join(xdg if xdg.strip() else "~/.local/state", "vmctl")
    return os.path.abspath(os.path.join(os.path.expanduser(home), "instances", name))


def fast_exec(args: list[str]) -> int | None:
    """Run `exec NAME -- CMD...`; None when `args` is not exactly that form."""
    if len(args) < 4 or args[0] != "exec" or args[2] != "--" or args[1].startswith("-"):
        return None
    root = instance_dir(args[1])
    if root is None:
        return None
    from vmctl.errors import VmctlError
    from vmctl.vm import terminal
    from vmctl.vm.execchan import ExecChannel

    try:
        chan = ExecChannel.for_instance(root, args[1])
        if not chan.running():
            return None  # stale or gone: the full CLI reaps and explains
        return terminal.run(chan, quote_join(args[3:]))
    except VmctlError as e:
        return _fail(e.message, e.hint, e.exit_code)
    except KeyboardInterrupt:
        return 130


def exit_now(status: int) -> None:
    """Exit without the interpreter's teardown once a verb is done.

    Freeing every module the CLI imported takes 60-90 ms after the last
    line is printed (measured on `vmctl up --detach`: a third of its own
    overhead over raw QEMU). Exit handlers still run and output is
    flushed; only while a non-daemon thread is alive is the normal exit kept.
    """
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        sys.exit(status)
    import atexit
    import contextlib

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(status)


def main() -> None:
    try:
        status = fast_exec(sys.argv[1:])
        if status is not None:
            sys.exit(status)
        from vmctl.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:  # a Ctrl-C before the CLI's own handler is in place
        print("interrupted", file=sys.stderr)
        exit_now(130)
    except SystemExit as e:
        code = e.code
        if code is not None and not isinstance(code, int):
            raise  # a message to print: the interpreter's own exit does that
        exit_now(code or 0)
    exit_now(0)
