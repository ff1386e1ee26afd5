"""The `nixos` image: the flake's agent guest, built by Nix, read as a manifest.

`vmctl up --image nixos [--flake REF] [--config NAME]` builds
`REF#nixosConfigurations.NAME.config.system.build.vmctlManifest` with
`nix build --json --no-link` and hands the `vmctl-image/1` manifest it
produces to the same boot path as the micro image. vmctl reads only that
JSON (and nix's own `--json` answer), never nix's human output, which is
streamed as progress and kept for error details.

The flake is, in order: `--flake`, `$VMCTL_FLAKE`, the checkout this
package runs from (a folder with flake.nix two levels above it), else the
published flake (`PUBLISHED_FLAKE`, a placeholder until the project has a
public home: set VMCTL_FLAKE).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
from collections import deque
from pathlib import Path

from vmctl import paths, procs, ui
from vmctl.errors import ConfigError, VMError

#: Where an installed (non-checkout) vmctl finds its flake; override with VMCTL_FLAKE.
PUBLISHED_FLAKE = "github:OWNER/vmctl"
#: The attribute of a NixOS configuration that builds the manifest.
MANIFEST_ATTR = "config.system.build.vmctlManifest"
NIX_FLAGS = ("--extra-experimental-features", "nix-command flakes")
INSTALL_HINT = "install Nix (https://nixos.org/download) or use --image micro"
BUILDER_HINT = (
    "a Mac needs a Linux builder: nix-darwin's `nix.linux-builder.enable = true`, "
    "or `nix run nixpkgs#darwin.linux-builder` (see docs/nix.md)"
)
TAIL_LINES = 25
_CONFIG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_BUILDER_RE = re.compile(
    r"required system or feature not available|is required to build .*but I am a|"
    r"a '[a-z0-9_]+-linux' with features .* is required",
)
_NO_ATTR_RE = re.compile(r"does not provide attribute|attribute '[^']*' missing")


def _checkout_flake() -> str | None:
    root = Path(__file__).resolve().parents[3]
    return str(root) if (root / "flake.nix").is_file() else None


#: The flake used when neither --flake nor VMCTL_FLAKE says otherwise.
DEFAULT_FLAKE = _checkout_flake() or PUBLISHED_FLAKE


def default_flake() -> str:
    return os.environ.get("VMCTL_FLAKE") or DEFAULT_FLAKE


def default_config(machine: str | None = None) -> str:
    """`agent-<arch>-linux` for this host's CPU: the guest is always Linux."""
    m = (machine or platform.machine()).lower()
    arch = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}.get(m)
    if arch is None:
        raise VMError(f"no NixOS agent image for a {m} host", "use an x86_64 or aarch64 machine")
    return f"agent-{arch}-linux"


def _check_ref(flake: str, config: str) -> None:
    if not flake or flake.startswith("-") or any(c.isspace() or c == "#" for c in flake):
        raise ConfigError(f"invalid flake reference {flake!r}", "use e.g. --flake github:o/r or .")
    if not _CONFIG_RE.match(config):
        raise ConfigError(
            f"invalid NixOS configuration name {config!r}", "use e.g. agent-x86_64-linux"
        )


def _tail(lines: deque[str] | list[str]) -> str:
    return "\n".join(lines) or "(nix printed nothing)"


def nix_available(flake: str | None = None, *, timeout: float = 5.0) -> str | None:
    """None when `nix` runs and can evaluate the flake offline, else why not.

    Every call is bounded by `timeout`: this never hangs on a missing
    network. It asks nothing of the network (`--offline`).
    """
    nix = shutil.which("nix")
    if nix is None:
        return "nix is not installed"
    flake = flake or default_flake()
    checks = (
        [nix, "--version"],
        [nix, *NIX_FLAGS, "eval", "--offline", "--json", f"{flake}#nixosConfigurations",
         "--apply", "builtins.attrNames"],
    )  # fmt: skip
    for argv in checks:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(argv[:4])} ...` did not answer in {timeout:.0f} s"
        except OSError as e:
            return f"nix cannot run: {e}"
        if r.returncode != 0:
            lines = r.stderr.strip().splitlines() or ["no output"]
            errors = [ln.removeprefix("error:").strip() for ln in lines if ln.startswith("error:")]
            return f"nix cannot evaluate {flake} offline: {(errors or lines)[-1]}"
    return None


def nix_probe(flake: str | None = None) -> str | None:
    """`nix_available` for `--image auto`, remembered per boot, nix binary and flake.

    The probe evaluates the flake: 70 ms where Nix cannot, seconds where
    it can, before every `vmctl up` would start its guest. A changed nix,
    flake.nix or flake.lock asks again, and so does a probe that timed out.
    """
    nix = shutil.which("nix")
    if nix is None:
        return "nix is not installed"
    flake = flake or default_flake()
    cache = _probe_file(nix, flake)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(cache.read_text())["reason"]
        return saved if isinstance(saved, str) else None
    reason = nix_available(flake)
    if reason is None or reason.startswith("nix cannot evaluate"):  # answers, not accidents
        with contextlib.suppress(OSError):
            cache.write_text(json.dumps({"reason": reason}) + "\n")
            paths.keep_newest(cache.parent, "probe-*.json", 1)  # one answer: a bounded folder
    return reason


def _probe_file(nix: str, flake: str) -> Path:
    import hashlib

    boot = procs.boot_id()
    parts = [boot, nix, flake]
    for path in (Path(nix), Path(flake) / "flake.nix", Path(flake) / "flake.lock"):
        with contextlib.suppress(OSError):
            st = path.stat()
            parts += [str(path), str(st.st_mtime_ns), str(st.st_size)]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return paths.private_dir(paths.cache_home() / "nix") / f"probe-{key[:24]}.json"


def _run_nix(argv: list[str]) -> tuple[int, str, list[str]]:
    """Run nix, streaming its stderr as progress; (status, stdout, last lines)."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, errors="replace",
        )  # fmt: skip
    except FileNotFoundError:
        raise VMError("nix is not installed", INSTALL_HINT) from None
    try:
        assert proc.stderr is not None and proc.stdout is not None
        for raw in proc.stderr:
            line = raw.rstrip()
            if line:
                tail.append(line)
                ui.info(f"[dim]  nix: {ui.escape(line)}[/]")
        out = proc.stdout.read()
        status = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: do not leave a build behind
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return status, out, list(tail)


def _build_error(flake: str, config: str, tail: list[str]) -> VMError:
    text = "\n".join(tail)
    details = _tail(tail)
    if _BUILDER_RE.search(text):
        return VMError(f"no Linux builder to build {config}", BUILDER_HINT, details=details)
    if _NO_ATTR_RE.search(text):
        return VMError(
            f"flake {flake} has no NixOS configuration {config!r} with a vmctl manifest",
            "pass --config agent-x86_64-linux or agent-aarch64-linux (or a lib.mkAgent name)",
            details=details,
        )
    return VMError(
        f"nix could not build the NixOS image {flake}#{config}",
        "read nix's output below; use --image micro meanwhile",
        details=details,
    )


def _out_path(stdout: str, flake: str, config: str) -> Path:
    """The manifest from `nix build --json`: `[{"drvPath", "outputs": {"out"}}]`."""
    try:
        results = json.loads(stdout)
        out = Path(results[0]["outputs"]["out"])
    except (ValueError, LookupError, TypeError):
        raise VMError(
            f"nix build of {flake}#{config} gave no output path",
            "check that the attribute is a derivation (system.build.vmctlManifest)",
            details=stdout.strip()[-2000:] or "(empty)",
        ) from None
    manifest = out / "manifest.json" if out.is_dir() else out
    if not manifest.is_file():
        raise VMError(f"nix built {out} but it holds no manifest", "rebuild with `nix build`")
    return manifest


def build_manifest(flake: str | None = None, config: str | None = None) -> Path:
    """Build the NixOS agent image with nix; return its manifest's path.

    `flake` defaults to `default_flake()`, `config` to `default_config()`.
    A rebuild after a change is fast: the guest shares the host's store.
    """
    flake = flake or default_flake()
    config = config or default_config()
    _check_ref(flake, config)
    nix = shutil.which("nix")
    if nix is None:
        raise VMError("nix is not installed", INSTALL_HINT)
    attr = f"{flake}#nixosConfigurations.{config}.{MANIFEST_ATTR}"
    argv = [nix, *NIX_FLAGS, "build", "--json", "--no-link", "--log-format", "raw", attr]
    with ui.step(f"building NixOS image {config} from {flake}"):
        status, stdout, tail = _run_nix(argv)
        if status != 0:
            raise _build_error(flake, config, tail)
        return _out_path(stdout, flake, config)
