"""A guest's sidecars listen from the start but start up once the guest is ready.

The guest sidecar and the egress proxy start beside QEMU (the sidecar is
the watchdog of a booting guest; vmctl.vm.boot). Their own start-up
(asyncio and vmctl's modules, ~100 ms of CPU each) used to overlap the
boot, and on a 2-core host under TCG that made the guest ready 0.13 s later
(median of 11, alternated: a third of `vmctl up`'s overhead over raw QEMU).
So `vmctl up` starts them through this module, which imports only os and
socket:

1. it binds the sidecar's UNIX socket at once, so `vmctl up` sees it
   listening and a guest connection waits in its backlog;
2. it blocks on a pipe until `vmctl up` closes it: when the guest is
   ready, or when `vmctl up` dies (the kernel closes it then);
3. then it runs the sidecar's module in this process, which takes the
   bound socket (`listener`).

Whether the owner died is the sidecar's own question, answered from the
instance record as before; this module only decides when it starts.

`python -m vmctl.sidecars.hold` prints its usage.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

USAGE = "usage: python -m vmctl.sidecars.hold GATE_FD SOCKET MODULE [ARG...]"
#: How `main` hands its bound socket to the module it runs: "FD:PATH".
ENV = "VMCTL_HELD_LISTENER"


def argv(gate: int | None, sock: str, module: str, args: list[str]) -> list[str]:
    """The command that runs `module` held behind `gate` (or at once, when None)."""
    if gate is None:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "vmctl.sidecars.hold", str(gate), sock, module, *args]


def bind_unix(path: str, backlog: int) -> socket.socket:
    """A listening UNIX socket at `path` (a stale one replaced), mode 0600."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    old = os.umask(0o177)
    try:
        s.bind(path)
    finally:
        os.umask(old)
    s.listen(backlog)
    return s


def listener(path: str, backlog: int) -> socket.socket:
    """The socket `main` bound for `path`, else a new one; non-blocking, for asyncio."""
    fd, _, held = os.environ.pop(ENV, "").partition(":")
    if held == path:
        s = socket.socket(fileno=int(fd))
        s.listen(backlog)
    else:
        s = bind_unix(path, backlog)
    s.setblocking(False)
    return s


def main(args: list[str]) -> int:
    if len(args) < 3 or not args[0].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    gate, path, module = int(args[0]), args[1], args[2]
    s = bind_unix(path, 256)
    while os.read(gate, 64):  # EOF: the guest is ready, or `vmctl up` is gone
        pass
    os.close(gate)
    s.set_inheritable(False)
    os.environ[ENV] = f"{s.detach()}:{path}"
    import runpy

    sys.argv = [module, *args[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
