"""What `vmctl up` loads before its guest starts.

Every module imported on the way to QEMU is paid on every `vmctl up`
(bench/boot.py's `up_before_qemu_s`). These imports were measured and
moved out of that path: rich (~25 ms), yaml (~15 ms), asyncio through
qemu.qmp (~50 ms), pydantic through typer 0.29 (~80 ms), the sandbox's
policy modules (~30 ms). This keeps them out.
"""

from __future__ import annotations

import os
import subprocess
import sys

HEAVY = ("rich", "yaml", "asyncio", "pydantic", "jinja2", "aiohttp", "qemu.qmp", "pexpect")


def python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VMCTL_QUIET"}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def test_the_up_path_imports_none_of_the_heavy_modules() -> None:
    r = python(
        "import sys\n"
        "import vmctl.cli\n"
        "vmctl.cli.compose('up')\n"  # the verb's module and everything it imports
        "import vmctl.vm.instance, vmctl.endpoint, vmctl.images.choose\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_plain_progress_line_skips_rich_and_markup_still_renders() -> None:
    r = python(
        "import sys\n"
        "from vmctl import ui\n"
        "ui.info('image: micro (a plain line)')\n"
        "ui.info('model endpoint: http://127.0.0.1:8080')\n"
        "print('rich' in sys.modules)\n"
        "ui.info('[dim]styled[/] line :)')\n"
        "print('rich' in sys.modules)\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]
    lines = [
        "image: micro (a plain line)",
        "model endpoint: http://127.0.0.1:8080",
        "styled line :)",
    ]
    assert r.stderr.splitlines() == lines
