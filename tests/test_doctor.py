"""`vmctl doctor` reports real probes, and a fix for each missing piece."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    clients = checks["host clients"]
    said = clients["detail"] + (clients["fix"] or "")
    assert all(c in said for c in ("llm", "opencode", "claude", "codex"))  # every run client
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


def test_accelerator_is_the_one_vmctl_up_would_use(qemu_bin: Path) -> None:
    """doctor probes KVM with the guest's own kernel, as `up` does: no "kvm ok" then a TCG boot."""
    from vmctl.images import manifest, micro
    from vmctl.vm import accel

    built = micro.find_built(("opencode",)) or micro.find_built(())
    if built is None:
        pytest.skip("no micro image built")
    kernel = manifest.load_manifest(built).kernel
    expected = accel.choose("auto", str(qemu_bin), kernel=kernel)
    got = doctor()["accelerator"]
    assert str(got["detail"]).split(":")[0] == expected.name
    if expected.name == "tcg" and expected.reason:
        assert expected.reason in str(got["detail"])
