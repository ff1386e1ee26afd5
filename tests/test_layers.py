"""The house plan holds: the import-linter contracts in pyproject.toml are kept.

Layers (cli over the path packages over the foundations), sidecars on the
foundations alone, a standard-library `vmctl exec` fast path, verb modules
that never import the app composing them, and no cycles anywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    status = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "0 broken" in out, out
