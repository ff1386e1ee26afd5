"""The last lines of a log, for error details: one bounded way to read them.

QEMU's and the guest console's logs, llama-server's log: whoever fails
shows its last lines, reading at most the final 16 KiB however large the
log has grown.
"""

from __future__ import annotations

import os
from pathlib import Path

TAIL_BYTES = 16384


def tail_lines(path: Path, n: int = 15) -> str:
    """The last `n` non-blank lines of `path` ('' if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.rstrip("\r") for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-n:])
