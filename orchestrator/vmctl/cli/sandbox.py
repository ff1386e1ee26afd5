"""`vmctl sandbox list|show|exec`: inspect and try the host sandbox profiles.

For people who debug a policy: `show` prints what a profile renders to
(SBPL text and its -D parameters, or the bwrap argv) with example values,
`exec` runs any command under a profile on this platform.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from pathlib import Path

import typer

from vmctl import paths
from vmctl.cli import app, passthrough
from vmctl.errors import ConfigError
from vmctl.sandbox import launch as sandbox
from vmctl.sandbox import policy

sandbox_app = typer.Typer(
    help="Inspect and try the host sandbox profiles.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(sandbox_app, name="sandbox")

EXAMPLE = Path("/example")


def example_context(profile: str, workspace: Path | None) -> sandbox.SandboxContext:
    """Obviously fake values for every placeholder, so any profile renders."""
    run = EXAMPLE / "servers" / "example" / "run"
    return sandbox.SandboxContext(
        binary=EXAMPLE / "bin" / profile,
        cache=run / "cache",
        runtime=run,
        model=(EXAMPLE / "models" / "model.gguf",),
        workspace=sandbox.check_workspace(workspace) if workspace else EXAMPLE / "workspace",
        state=EXAMPLE / "state" / profile,
        endpoint_port=8080,
        endpoint_socket=run / "llama.sock",
    )


def _lines(argv: list[str]) -> str:
    """One option (with its values) per line, like a wrapped shell command."""
    out: list[str] = []
    for arg in argv:
        if arg.startswith("-") and out and not out[-1].endswith(" --"):
            out.append(shlex.quote(arg))
        elif out:
            out[-1] += " " + shlex.quote(arg)
        else:
            out.append(shlex.quote(arg))
    return " \\\n  ".join(out)


@sandbox_app.command("list")
def list_cmd(
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the host profiles and where each comes from."""
    rows = []
    for name in policy.list_profiles():
        pol = policy.load(name)
        rows.append(
            {
                "name": name,
                "network": pol.network,
                "description": pol.description,
                "source": str(pol.source),
            }
        )
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(f"{row['name']:<14} {row['network']:<8} {row['description']}")


@sandbox_app.command("show")
def show(
    profile: str = typer.Argument(..., help="Profile name (see `vmctl sandbox list`)."),
    platform: str | None = typer.Option(None, "--platform", help="darwin or linux."),
    workspace: Path | None = typer.Option(None, "-w", "--workspace", help="A real workspace."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print what PROFILE renders to, with example placeholder values."""
    key = platform or policy.current_platform()
    ctx = example_context(profile, workspace)
    cmd = sandbox.sandboxed_command(profile, [str(ctx.binary)], ctx, platform=key, render_only=True)
    text = next(iter(cmd.files.values()), None)
    if json_out:
        print(json.dumps({"platform": key, "argv": cmd.argv, "profile": text, "env": cmd.env}))
        return
    print(f";; profile {profile} on {key} (example values under {EXAMPLE})")
    if text is not None:
        print(text)
    print(_lines(cmd.argv))
    print("\n;; environment (nothing else passes):")
    for k, v in cmd.env.items():
        print(f"{k}={v}")


@sandbox_app.command("exec")
def exec_cmd(
    profile: str = typer.Argument(..., help="Profile name."),
    workspace: Path | None = typer.Option(None, "-w", "--workspace", help="Workspace folder."),
    model: list[Path] = typer.Option([], "--model", help="A model file (llama-server)."),
    read: list[Path] = typer.Option([], "--read", help="Extra read-only path."),
    socket: Path | None = typer.Option(None, "--socket", help="Endpoint UNIX socket."),
    port: int | None = typer.Option(None, "--port", help="Endpoint port (macOS)."),
) -> None:
    """Run a command (after --) under PROFILE on this platform; exit status is its."""
    cmd = passthrough()
    if not cmd:
        raise ConfigError("no command given", "vmctl sandbox exec PROFILE -- CMD [ARGS...]")
    pol = policy.load(profile)
    needs = pol.placeholders(policy.current_platform())
    ws = None
    if "workspace" in needs:
        ws = sandbox.check_workspace(workspace or Path.cwd())
    scratch = Path(tempfile.mkdtemp(prefix="exec-", dir=paths.home()))
    try:
        for sub in ("state", "run/cache"):
            (scratch / sub).mkdir(parents=True, mode=0o700)
        ctx = sandbox.SandboxContext(
            binary=sandbox.which(cmd[0]),
            cache=scratch / "run" / "cache",
            runtime=scratch / "run",
            model=tuple(model),
            workspace=ws,
            state=scratch / "state",
            endpoint_port=port,
            endpoint_socket=socket,
            extra_read=tuple(read),
        )
        code = sandbox.run_sandboxed(profile, cmd, ctx, profile_dir=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    raise SystemExit(code)  # typer.Exit would be swallowed in non-standalone mode
