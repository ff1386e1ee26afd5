"""What `vmctl up` loads before its guest starts.

Every module imported on the way to QEMU is paid on every `vmctl up`
(bench/boot.py's `up_before_qemu_s`). These imports were measured and
moved out of that path: rich (~25 ms), yaml (~15 ms), asyncio through
qemu.qmp (~50 ms), pydantic through typer 0.29 (~80 ms), the sandbox's
policy modules (~30 ms), importlib.resources (~7 ms, for reading vmctl's
own data files), platformdirs on Linux (~5 ms). This keeps them out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = (
    *("rich", "yaml", "asyncio", "pydantic", "jinja2", "aiohttp", "qemu.qmp", "pexpect"),
    *("importlib.resources", "argparse"),
    *(["platformdirs"] if sys.platform.startswith("linux") else []),
)


def python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VMCTL_QUIET", "FORCE_COLOR")}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def test_the_up_path_imports_none_of_the_heavy_modules() -> None:
    r = python(
        "import sys\n"
        "import vmctl.cli\n"
        "vmctl.cli.compose('up')\n"  # the verb's module and everything it imports
        "import vmctl.vm.boot, vmctl.endpoint, vmctl.images.choose\n"
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
        "ui.warn('KVM unusable')\n"  # vmctl's own styles, off a terminal: plain
        "with ui.step('booting'):\n"
        "    pass\n"
        "print('rich' in sys.modules)\n"
        "ui.info('[bold]x[/bold] [link=https://example.org]y[/link] :)')\n"
        "print('rich' in sys.modules)\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]
    lines = [
        "image: micro (a plain line)",
        "model endpoint: http://127.0.0.1:8080",
        "warning: KVM unusable",
        "booting ...",
        "booting: done in 0.0 s",
        "x y :)",
    ]
    assert r.stderr.splitlines() == lines


def test_where_colour_is_asked_for_styled_lines_go_through_rich() -> None:
    r = python(
        "import os, sys\n"
        "os.environ['FORCE_COLOR'] = '1'\n"
        "from vmctl import ui\n"
        "ui.warn('KVM unusable')\n"
        "print('rich' in sys.modules)\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True"]
    assert "\x1b[" in r.stderr and "KVM unusable" in r.stderr


def test_linux_folders_are_platformdirs_answers_without_its_import(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import platformdirs

    from vmctl import paths

    if not sys.platform.startswith("linux"):
        pytest.skip("paths asks platformdirs itself off Linux")
    monkeypatch.delenv("VMCTL_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for xdg in ("", str(tmp_path / "xdg")):
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert paths.cache_home() == Path(platformdirs.user_cache_dir("vmctl", appauthor=False))
