"""`vmctl doctor` reports real probes, and a fix for each missing piece."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import vmctl_cmd


def doctor(env: dict[str, str] | None = None) -> dict[str, dict[str, object]]:
    out = subprocess.run(
        vmctl_cmd("doctor", "--json"),
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["platform"] == sys.platform
    return {c["name"]: c for c in report["checks"]}


def test_reports_every_part_with_a_fix_when_missing() -> None:
    checks = doctor()
    names = {"qemu", "accelerator", "llama-server", "nix", "embedded model", "guest image"}
    assert names | {"workspace owner"} <= set(checks)
    for check in checks.values():
        assert isinstance(check["ok"], bool) and check["detail"]
        if not check["ok"]:
            assert check["fix"], f"{check['name']} is missing but has no fix"


def test_missing_qemu_is_reported_with_the_package(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    checks = doctor({"PATH": str(empty)})
    assert checks["qemu"]["ok"] is False
    assert "qemu" in str(checks["qemu"]["fix"])


def test_sandbox_probe_is_real_on_linux(bwrap_bin: Path) -> None:
    checks = doctor()
    assert checks["bwrap"]["ok"] is True
    assert str(bwrap_bin) in str(checks["bwrap"]["detail"])
