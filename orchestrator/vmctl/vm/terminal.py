"""`vmctl exec` and `vmctl shell` on this process's own stdin, stdout and stderr.

The plain form streams stdin to EOF, stdout and stderr to their own fds,
and returns the command's status (vmctl.entry calls it with nothing more
imported). With a TTY (`-t`, `shell`) the guest runs the command on a pty
sized like this terminal, which is put in raw mode so every key, Ctrl-C
included, reaches the guest; a resize here is sent as a window change.
"""

from __future__ import annotations

import os
import sys

from vmctl.vm.execchan import ExecChannel, Tty

TYPE_CHECKING = False  # no typing import at run time: `vmctl exec` start-up counts
if TYPE_CHECKING:
    from vmctl.vm.execchan import Sink

#: `vmctl shell`: the agent user's own login shell (passwd), in the workspace (else home).
LOGIN_SHELL = (
    "cd /workspace 2>/dev/null || cd; "
    's=$(grep "^$USER:" /etc/passwd | cut -d: -f7); exec "${s:-/bin/sh}" -l'
)


def fd_sink(fd: int) -> Sink:
    """Write each chunk whole to `fd` (BrokenPipeError ends the session)."""

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


def _stdin() -> int | None:
    try:
        os.fstat(0)
    except OSError:
        return None  # closed: the command gets an empty stdin
    return 0


def say_if_paused(chan: ExecChannel) -> None:
    """A guest the disk floor paused runs nothing until space is back: say so, not hang."""
    if chan.paused():
        print(
            f"vmctl: {chan.name} is paused: its workspace's disk is under the floor; this waits "
            f"until space is back (see `vmctl status {chan.name}`)",
            file=sys.stderr,
            flush=True,
        )


def run(chan: ExecChannel, command: str) -> int:
    """The command's exit status; 141 when our stdout closed (as SIGPIPE would)."""
    say_if_paused(chan)
    try:
        return chan.run(command, fd_sink(1), on_stderr=fd_sink(2), stdin=_stdin())
    except BrokenPipeError:
        return 141


def _size() -> tuple[int, int]:
    for fd in (0, 1, 2):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        return size.lines, size.columns
    return 24, 80


def run_tty(chan: ExecChannel, command: str) -> int:
    """Run `command` on a guest pty driven from this terminal; its exit status.

    Raw mode on stdin (when it is a terminal) and a SIGWINCH wake-up fd last
    exactly as long as the session, however it ends.
    """
    import signal
    import termios
    import tty

    say_if_paused(chan)
    rows, cols = _size()
    resize, wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_handler = signal.signal(signal.SIGWINCH, lambda *_: None)
    old_fd = signal.set_wakeup_fd(wake, warn_on_full_buffer=False)
    saved = termios.tcgetattr(0) if os.isatty(0) else None
    try:
        if saved is not None:
            tty.setraw(0)
        session_tty = Tty(rows, cols, os.environ.get("TERM", ""), resize)
        session_tty.size = _size
        return chan.run(command, fd_sink(1), stdin=_stdin(), tty=session_tty)
    except BrokenPipeError:
        return 141
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGWINCH, old_handler)
        os.close(resize)
        os.close(wake)
