"""A built wheel carries everything vmctl reads at run time.

host-profiles/ lives beside the package in the repository; setup.py copies
it into the wheel. Without it a plain `pip install .` would find no policy.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import need

ROOT = Path(__file__).resolve().parent.parent


def _source_copy(dest: Path) -> Path:
    """The files git would ship, copied: no stale build/ folder can help."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for rel in listed:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def test_wheel_carries_profiles_contract_and_guest_files(tmp_path: Path) -> None:
    # Not inside a Nix build sandbox, which has neither pip nor a git checkout.
    need(importlib.util.find_spec("pip") is not None, "pip")
    need(shutil.which("git") is not None and (ROOT / ".git").exists(), "a git checkout")
    src = _source_copy(tmp_path / "src")
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = out.glob("vmctl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    profiles = {p.name for p in (ROOT / "host-profiles").glob("*.toml")}
    assert {
        "llama-server.toml",
        "llm.toml",
        "opencode.toml",
        "claude.toml",
        "shell.toml",
    } <= profiles
    assert {f"vmctl/host-profiles/{p}" for p in profiles} <= names
    for needed in (
        "vmctl/data/guest-contract.json",
        "vmctl/data/catalog.toml",
        "vmctl/data/guest/vmctl-exec-agent.sh",
        "vmctl/data/guest/micro-init.sh.j2",
        "vmctl/templates/profile.sb.j2",
        "vmctl/py.typed",
    ):
        assert needed in names
