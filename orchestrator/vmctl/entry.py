"""The `vmctl` executable: a fast path for `exec`, the full CLI for the rest.

Agents and scripts call `vmctl exec NAME -- CMD` in loops, so its start-up
is most of the round trip. Importing the Typer CLI (typer, rich, aiohttp,
huggingface_hub, ...) costs about 200 ms; the exec path needs none of it.
The plain form `vmctl exec NAME -- CMD...` is handled here with stdlib
and three small vmctl modules; anything else (help, other flags) goes to
the full CLI, which behaves the same.
"""

from __future__ import annotations

import shlex
import sys


def _fail(message: str, hint: str | None, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return code


def fast_exec(args: list[str]) -> int | None:
    """Run `exec NAME -- CMD...`; None when `args` is not exactly that form."""
    if len(args) < 4 or args[0] != "exec" or args[2] != "--" or args[1].startswith("-"):
        return None
    from vmctl import paths
    from vmctl.errors import VmctlError
    from vmctl.procs import ProcessRef
    from vmctl.state import StateError, read_json
    from vmctl.vm.execchan import ExecChannel

    name, cmd = args[1], args[3:]
    try:
        ipaths = paths.instance(name)
        try:
            meta = read_json(ipaths.meta, {"qemu": dict})
            alive = ProcessRef.from_json(meta["qemu"]).alive()
        except (StateError, ValueError):
            return None  # missing or stale: the full CLI reaps and explains
        if not alive:
            return None
        out = sys.stdout.buffer

        def write(data: bytes) -> None:
            out.write(data)
            out.flush()

        chan = ExecChannel(ipaths.exec_in, ipaths.exec_out, ipaths.lock, name)
        return chan.run(shlex.join(cmd), write)
    except VmctlError as e:
        return _fail(e.message, e.hint, e.exit_code)
    except KeyboardInterrupt:
        return 130


def main() -> None:
    status = fast_exec(sys.argv[1:])
    if status is not None:
        sys.exit(status)
    from vmctl.cli import main as cli_main

    cli_main()
