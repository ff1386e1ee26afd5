"""`vmctl doctor`: what is present and usable here, with a fix for each gap.

Each check really exercises the part where that is cheap (a bwrap probe,
the accelerator probe QEMU uses), so "ok" means usable, not just installed.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from vmctl.clients import registry
from vmctl.errors import VmctlError
from vmctl.images import manifest, micro
from vmctl.images.nixos import nix_available
from vmctl.models.fetch import resolve_model
from vmctl.sandbox.launch import check_available
from vmctl.serve.server import find_llama_server
from vmctl.vm import accel


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unusable: {e}"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def _qemu() -> Check:
    arch = "aarch64" if platform.machine() in ("arm64", "aarch64") else "x86_64"
    binary = shutil.which(f"qemu-system-{arch}")
    pkg = "brew install qemu" if sys.platform == "darwin" else "apt-get install qemu-system-x86"
    if not binary:
        return Check("qemu", False, f"qemu-system-{arch} not found", pkg)
    return Check("qemu", True, f"{binary}: {_version([binary, '--version'])}")


def _guest_kernel() -> Path | None:
    """The built micro image's kernel: `vmctl up` probes KVM by booting it, so doctor does too."""
    if not sys.platform.startswith("linux"):
        return None
    for agents in (("opencode",), ()):
        built = micro.find_built(agents)
        if built is not None:
            try:
                return manifest.load_manifest(built).kernel
            except VmctlError:
                continue
    return None


def _accel() -> Check:
    arch = "aarch64" if platform.machine() in ("arm64", "aarch64") else "x86_64"
    qemu = shutil.which(f"qemu-system-{arch}")
    if not qemu:
        return Check("accelerator", False, "no QEMU to probe with", "install QEMU first")
    try:
        chosen = accel.choose("auto", qemu, kernel=_guest_kernel())
    except VmctlError as e:
        return Check("accelerator", False, e.message, e.hint)
    name = getattr(chosen, "name", str(chosen))
    why = getattr(chosen, "reason", "") or ""
    fix = None
    if name == "tcg":
        fix = "guests run under software emulation (slow); enable KVM/HVF for speed"
    return Check("accelerator", True, f"{name}{': ' + why if why else ''}", fix)


def _sandbox() -> Check:
    tool = "sandbox-exec" if sys.platform == "darwin" else "bwrap"
    try:
        check_available()
    except VmctlError as e:
        return Check(tool, False, e.message, e.hint)
    where = "/usr/bin/sandbox-exec" if sys.platform == "darwin" else shutil.which("bwrap")
    return Check(tool, True, f"{where}: usable")


def _workspace_ids() -> Check:
    from vmctl.vm import idmap

    try:
        ids = idmap.choose()
    except VmctlError as e:
        return Check("workspace owner", False, e.message, e.hint)
    detail = ids.describe() + (f" ({ids.note})" if ids.note else "")
    return Check("workspace owner", True, detail)


def _workspace_share() -> Check:
    """9p always works; virtio-fs (`--share virtiofs`) where its daemon can be confined."""
    from vmctl import contract
    from vmctl.vm import idmap, virtiofs

    try:
        ids = idmap.choose()
    except VmctlError:
        ids = idmap.IdMap("guest", 0, 0)
    refused = virtiofs.unsupported(ids, tuple(contract.transports()))
    if refused is None:
        return Check("workspace share", True, f"9p (default); virtiofs: {virtiofs.find_daemon()}")
    return Check("workspace share", True, f"9p (default); virtiofs unavailable: {refused[0]}")


def _llama() -> Check:
    try:
        path = find_llama_server()
    except VmctlError as e:
        return Check("llama-server", False, e.message, e.hint)
    return Check("llama-server", True, str(path))


def _nix() -> Check:
    reason = nix_available()
    if reason:
        return Check(
            "nix", False, reason, "the micro image is used instead (vmctl up --image micro)"
        )
    return Check("nix", True, _version(["nix", "--version"]))


def _models() -> Check:
    try:
        local = resolve_model(None, pull=False)
    except VmctlError as e:
        return Check("embedded model", False, e.message, e.hint)
    size = local.path.stat().st_size / 1e6
    return Check("embedded model", True, f"{local.alias}: {local.path} ({size:.0f} MB)")


def _hf_cache() -> Check:
    try:
        # Here, not at the top: ~15 ms CPU on every `vmctl` start-up (measured).
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
    except Exception as e:
        return Check("model cache", False, f"huggingface_hub unusable: {e}")
    return Check("model cache", True, f"{cache} (shared with llama.cpp -hf)")


def _image() -> Check:
    if not sys.platform.startswith("linux"):
        return Check("guest image", True, "built on demand (vmctl up)")
    for agents in (("opencode",), ()):
        built = micro.find_built(agents)
        if built is not None:
            with_ = f" with {', '.join(agents)}" if agents else ""
            return Check("guest image", True, f"micro{with_}: {built.parent}")
    return Check(
        "guest image",
        False,
        "no micro image built for this vmctl",
        "vmctl image build micro --with opencode (or let vmctl up build a plain one)",
    )


def _clients() -> Check:
    found, missing = [], []
    for name in ("llm", "opencode", "claude", "codex"):
        try:
            found.append(f"{name}={registry.get(name).find(None)}")
        except VmctlError:
            missing.append(name)
    detail = ", ".join(found) or "none found"
    fix = f"missing {', '.join(missing)}: scripts/install-agents.sh" if missing else None
    return Check("host clients", not missing, detail, fix)


CHECKS: list[Callable[[], Check]] = [
    _qemu,
    _accel,
    _sandbox,
    _workspace_ids,
    _workspace_share,
    _llama,
    _nix,
    _models,
    _hf_cache,
    _image,
    _clients,
]


def run_checks() -> list[Check]:
    """Run every check; a check that crashes is reported, not raised."""
    results = []
    for check in CHECKS:
        try:
            results.append(check())
        except Exception as e:  # a broken probe must not hide the others
            fix = "a bug in vmctl doctor: please report it"
            results.append(Check(check.__name__.strip("_"), False, f"check failed: {e}", fix))
    return results
