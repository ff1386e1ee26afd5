"""`vmctl image prune` on a cache laid out as the builder lays it out.

The images here are folders with the builder's files (manifest, inputs,
own key) rather than real builds: what is tested is which of them the
real CLI removes, keys computed by the real micro builder code.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import need, vmctl_cmd
from vmctl.images import micro, micro_agents

KERNEL = ["linux-image-test", "1"]


def _image(root: Path, name: str, agents: tuple[str, ...], key: str | None, age: int) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "vmlinux").write_bytes(b"k" * 1000)
    if key is None:  # a build that died before its manifest
        return folder
    manifest = {"format": "vmctl-image/1", "name": "micro", "features": list(agents)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    versions = {a: micro_agents.AGENTS[a].version for a in agents}
    (folder / "inputs.json").write_text(json.dumps({"agents": versions, "kernel": KERNEL}))
    (folder / "own-key").write_text(key + "\n")
    stamp = 1_700_000_000 + age
    os.utime(folder / "manifest.json", (stamp, stamp))
    return folder


def test_prune_keeps_what_vmctl_would_use_and_removes_the_rest(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    images = cache / "images"
    key = micro.own_key(("llm",))
    older = _image(images, "micro-older", ("llm",), key, age=1)
    newest = _image(images, "micro-newest", ("llm",), key, age=2)
    stale = _image(images, "micro-stale", ("llm",), "0123456789abcdef", age=3)
    broken = _image(images, "micro-broken", (), None, age=0)
    crashed = images / ".micro-abc123"  # a build's own folder, left by a crash long ago
    building = images / ".micro-def456"  # a build going on now
    for folder in (crashed, building):
        folder.mkdir()
    os.utime(crashed, (1_700_000_000, 1_700_000_000))
    llm = micro_agents.AGENTS["llm"]
    used = images / "agents" / f"llm-{llm.version}"
    pinned = images / "agents" / micro_agents.AGENTS["claude"].folder().name
    old_agent = images / "agents" / "llm-0.1"
    kept_kernel = images / "kernels" / f"{KERNEL[0]}_{KERNEL[1]}"
    old_kernel = images / "kernels" / "linux-image-test_0"
    for folder in (used, pinned, old_agent, kept_kernel, old_kernel):
        folder.mkdir(parents=True)
        (folder / "f").write_bytes(b"x" * 100)
    env = {**os.environ, "VMCTL_CACHE": str(cache), "VMCTL_HOME": str(tmp_path / "home")}

    dry = subprocess.run(vmctl_cmd("image", "prune", "--dry-run"), env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would remove 4 images, 1 agent installs, 1 kernels"), dry.stdout
    assert older.exists() and old_agent.exists()

    out = subprocess.run(vmctl_cmd("image", "prune", "--json"), env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert sorted(report["images"]) == sorted(str(p) for p in (older, stale, broken, crashed))
    assert report["agents"] == [str(old_agent)] and report["kernels"] == [str(old_kernel)]
    # Three kernels of 1000 bytes, two folders of 100, plus the builder's small files.
    assert 3200 < report["bytes"] < 6000 and report["dry_run"] is False
    assert newest.exists() and used.exists() and pinned.exists() and kept_kernel.exists()
    assert not any(p.exists() for p in (older, stale, broken, crashed, old_agent, old_kernel))
    assert building.exists()


def test_prune_never_names_the_image_install_sh_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real cache: what `vmctl up` would boot, its agents and its kernel all stay."""
    import platformdirs

    cache = Path(
        os.environ.get("VMCTL_CACHE") or platformdirs.user_cache_dir("vmctl", appauthor=False)
    )
    monkeypatch.setenv("VMCTL_CACHE", str(cache))
    env = {**os.environ, "VMCTL_HOME": str(tmp_path / "home")}
    agents = ("claude", "codex", "llm", "opencode")  # scripts/install.sh's image
    built = micro.find_built(agents)
    need(built is not None, "no micro image built yet (scripts/install.sh)")
    assert built is not None
    out = subprocess.run(vmctl_cmd("image", "prune", "--dry-run", "--json"), env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    named = {Path(p) for key in ("images", "agents", "kernels") for p in report[key]}
    inputs = json.loads((built.parent / "inputs.json").read_text())
    keep = {built.parent, *(built.parent.parent / "agents" / f"{a}-{v}"
                            for a, v in inputs["agents"].items())}  # fmt: skip
    keep.add(built.parent.parent / "kernels" / f"{inputs['kernel'][0]}_{inputs['kernel'][1]}")
    assert not keep & named, keep & named
    assert all(p.exists() for p in keep) and report["dry_run"] is True


def test_a_build_names_what_prune_would_free_once_it_is_worth_a_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmctl.images import prune

    monkeypatch.setenv("VMCTL_CACHE", str(tmp_path / "cache"))
    images = tmp_path / "cache" / "images"
    key = micro.own_key(("llm",))
    _image(images, "micro-newest", ("llm",), key, age=2)
    assert prune.hint(min_bytes=1) is None  # nothing stale
    _image(images, "micro-older", ("llm",), key, age=1)
    _image(images, "micro-stale", ("llm",), "0123456789abcdef", age=3)
    old_kernel = images / "kernels" / "linux-image-test_0"
    old_kernel.mkdir(parents=True)
    (old_kernel / "vmlinux").write_bytes(b"x" * 100)
    line = prune.hint(min_bytes=1)
    assert line is not None
    assert line.startswith("the image cache also holds 2 older images and 1 kernels (")
    assert line.endswith("`vmctl image prune` removes them")
    assert prune.hint(min_bytes=10**9) is None  # too little to mention
    assert (images / "micro-older").exists()  # a hint removes nothing


def test_a_hint_that_cannot_measure_the_cache_says_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prune beside the build may remove a folder while it is measured: the build goes on."""
    from vmctl.images import prune

    def vanished(guests_running: bool) -> prune.Plan:
        raise FileNotFoundError("micro-older/vmlinux")

    monkeypatch.setattr(prune, "plan", vanished)
    assert prune.hint(min_bytes=1) is None
