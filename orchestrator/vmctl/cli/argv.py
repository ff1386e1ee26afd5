"""Arguments after the first `--`: split off before click parses anything.

An optional positional argument could otherwise swallow them. Verbs that
pass arguments through (llama-server, QEMU, a client, a sandboxed command)
read them with `passthrough()`.
"""

from __future__ import annotations

_passthrough: list[str] = []


def passthrough() -> list[str]:
    """Arguments after the first `--`, verbatim."""
    return list(_passthrough)


def split(argv: list[str]) -> list[str]:
    """The arguments click parses; the rest is kept for `passthrough()`."""
    if "--" in argv:
        i = argv.index("--")
        _passthrough[:] = argv[i + 1 :]
        return argv[:i]
    _passthrough.clear()
    return argv
