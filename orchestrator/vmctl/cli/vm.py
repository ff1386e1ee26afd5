"""`vmctl up`, `exec`, `shell`, `console`, `down`: guests, thinly.

Parsing and rendering only; the lifecycle lives in vmctl.vm (boot, instance). The
plain `vmctl exec NAME -- CMD` never gets here (entry.py's fast path).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import typer

from vmctl import endpoint, paths, ui
from vmctl.cli.argv import passthrough
from vmctl.errors import ConfigError, NotFoundError, VMError
from vmctl.images.choose import choose_image
from vmctl.sandbox.workspace import check_workspace
from vmctl.sidecars import floor
from vmctl.vm import boot, instance, terminal, virtiofs
from vmctl.vm.accel import check_name as check_accel
from vmctl.vm.accel import qemu_binary
from vmctl.vm.console import attach
from vmctl.vm.spec import InstanceSpec, parse_forward

verbs = typer.Typer()


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `with Instance`, so cleanup runs


def _workspace(path: Path) -> Path:
    try:
        return check_workspace(path)
    except ConfigError as e:
        raise ConfigError(e.message, "pass a project folder with -d DIR") from None


def _net_policy(net: str | None, policy: str | None) -> tuple[str | None, str | None]:
    """`--net` and `--policy` together; `--net full` is `--policy open`, said loudly."""
    if net == "full":
        if policy not in (None, "open"):
            raise ConfigError(f"--net full and --policy {policy} disagree", "drop --net full")
        ui.warn(
            "--net full is --policy open now: the guest reaches any public address by name "
            "through vmctl's egress proxy (logged); the host's loopback, private and "
            "metadata addresses stay closed unless `vmctl policy allow CIDR:PORT` names them"
        )
        return "model", "open"
    if policy is not None and net == "none":
        raise ConfigError(f"--policy {policy} needs a network", "drop --net none")
    if policy is not None:
        from vmctl import egress

        egress.preset(policy)  # a typo is named before any model or image work
        return "model", policy
    return net, None


@verbs.command(context_settings={"allow_extra_args": False})
def up(
    directory: Path = typer.Option(..., "-d", "--dir", help="The one host folder the guest sees."),
    ephemeral: bool = typer.Option(False, "--ephemeral", help="Remove everything at exit."),
    name: str | None = typer.Option(None, "--name", help="Instance name (default: generated)."),
    image: str = typer.Option("auto", "--image", help="auto | micro | nixos | PATH."),
    with_agents: list[str] = typer.Option(
        [], "--with", help="micro: agents the image must carry (opencode, claude, codex, llm)."
    ),
    flake: str | None = typer.Option(None, "--flake", help="nixos: flake reference."),
    config: str | None = typer.Option(None, "--config", help="nixos: configuration name."),
    net: str | None = typer.Option(
        None, "--net", help="model (= --policy locked) | none | full (= --policy open)."
    ),
    policy: str | None = typer.Option(
        None, "--policy", help="Egress preset: locked | balanced | open (see `vmctl policy`)."
    ),
    resolve: list[str] = typer.Option(
        [], "--resolve", help="HOST:ADDR: the egress proxy resolves HOST to ADDR (as curl's)."
    ),
    model_endpoint: str | None = typer.Option(None, "--model-endpoint", help="HOST:PORT."),
    server: str | None = typer.Option(
        None, "--server", help="The running `vmctl serve` to use (needed when several run)."
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Key of a non-vmctl endpoint (or VMCTL_API_KEY)."
    ),
    model: str | None = typer.Option(None, "--model", help="Model id if the endpoint is silent."),
    publish: list[str] = typer.Option([], "-p", help="HOST:GUEST loopback port forward."),
    mem: str = typer.Option("2G", "--mem"),
    cpus: int = typer.Option(2, "--cpus"),
    accel: str = typer.Option("auto", "--accel", help="auto | kvm | hvf | tcg."),
    detach: bool = typer.Option(False, "--detach", help="Return once the guest is ready."),
    max_conns: int = typer.Option(
        32, "--max-conns", min=1, max=4096, help="Model connections the guest may hold at once."
    ),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for readiness."),
    as_json: bool = typer.Option(False, "--json"),
    review: bool = typer.Option(
        False, "--review", help="The guest works on a copy; land its changes with `vmctl apply`."
    ),
    no_mirror: bool = typer.Option(
        False, "--no-mirror", help="Do not mirror the guest's listening ports on 127.0.0.1."
    ),
    share: str = typer.Option(
        "auto",
        "--share",
        envvar="VMCTL_SHARE",
        help="Workspace transport: auto (= 9p) | 9p | virtiofs (Linux, faster; see docs).",
    ),
    disk_floor: str | None = typer.Option(
        None,
        "--disk-floor",
        envvar=floor.ENV,
        help=floor.help_text("the guest"),
    ),
) -> None:
    """Boot a guest that sees DIR at /workspace (QEMU arguments after `--`)."""
    signal.signal(signal.SIGTERM, _sigterm)
    if not timeout > 0:
        raise ConfigError(f"--timeout {timeout} is not a positive number of seconds", "e.g. 120")
    instance.reap()
    ws = _workspace(directory)
    qemu_binary()  # a missing QEMU is reported before any image work
    check_accel(accel)
    name = name or _new_name()
    net, preset = _net_policy(net, policy)
    plan = endpoint.plan_guest(
        model_endpoint,
        server=server,
        api_key=api_key,
        model=model,
        net=net,
        proxy_env=preset not in (None, "locked"),
    )
    net, files = plan.net, plan.files
    if net == "model":
        preset = preset or "locked"
    elif resolve:
        raise ConfigError("--resolve needs the egress proxy", "use --policy or --net model")
    transport = virtiofs.requested(share, review)
    floor_bytes = None if disk_floor is None else floor.parse_size(disk_floor)
    # Before a review copy spends more of that disk (boot.up checks the copy's again).
    floor.resolve(paths.reviews_dir() if review else ws, floor_bytes)
    shared = _review_copy(name, ws) if review else ws
    spec = InstanceSpec(
        name=name,
        workspace=shared,
        net=net,
        policy=preset,
        resolve=tuple(resolve),
        model_endpoint=plan.endpoint,
        forwards=tuple(parse_forward(p) for p in publish),
        mem=mem,
        cpus=cpus,
        accel=accel,
        ephemeral=ephemeral,
        extra_args=tuple(passthrough()),
        fw_cfg=tuple(files),
        mirror=not no_mirror,
        share=transport,
        disk_floor=floor_bytes,
    )
    agents_wanted = tuple(with_agents) if with_agents else None
    try:
        manifest, image_name = choose_image(image, agents_wanted, flake=flake, config=config)
        inst = boot.up(
            spec,
            manifest,
            image=image_name,
            fwcfg=files,
            timeout=timeout,
            detach=detach,
            notices=list(plan.notices),
            max_conns=max_conns,
        )
    except BaseException:
        if review:
            from vmctl.review import snapshot

            snapshot.drop(name)  # nothing ran on it yet
        raise
    if detach:
        if as_json:
            print(json.dumps(inst.info().to_json(), indent=2))
        else:
            print(f"{name} is ready (console log: {paths.instance(name).console_log})")
            print(f"  vmctl exec {name} -- CMD...\n  vmctl console {name}\n  vmctl down {name}")
        return
    with inst:
        _foreground(inst)
    if review:
        _review_left(name, discard=False)


def _review_copy(name: str, ws: Path) -> Path:
    """Snapshot `ws` for a --review guest; the guest shares only the copy."""
    from vmctl.review import snapshot  # only --review needs it (and its diffing)

    try:
        if instance.Instance.load(name).alive():  # its copy is in use: never replace it
            raise VMError(f"instance {name!r} is running", f"vmctl down {name}")
    except NotFoundError:
        pass

    with ui.step(f"review copy of {ws}"):
        review, cost = snapshot.create(name, ws)
    ui.info(f"review copy: {cost.describe()}")
    return review.paths.work


def _review_left(name: str, discard: bool) -> None:
    """After `down`: keep (and say so) or drop a review guest's unapplied changes."""
    from vmctl.review import snapshot  # only a review guest's stop needs it

    line = snapshot.settle(name, discard)
    if line:
        print(line)


def _foreground(inst: Any) -> None:
    """Attach the console on a TTY, else wait for the guest to power off."""
    if sys.stdin.isatty():
        ui.info(f"attached to {inst.name}'s console; `exit` or Ctrl-] stops it")
        why = attach(inst.paths.console, stop_on_exit=True, name=inst.name)
        if why == "closed":
            ui.info(f"{inst.name}'s console closed: the guest is gone")
        else:
            what = "the console shell exited" if why == "exited" else "detached"
            ui.info(f"{what}: stopping {inst.name} (`vmctl up --detach` keeps a guest running)")
    elif inst.proc is not None:
        ui.info(f"{inst.name} is running; Ctrl-C stops it")
        inst.proc.wait()


def _new_name() -> str:
    while True:
        name = f"vm-{os.urandom(3).hex()}"  # not `secrets`: ~10 ms of imports for a name
        if not paths.instance(name).root.exists():
            return name


def _check_kind(name: str, verb: str) -> None:
    from vmctl import inventory  # not on `up`'s path: servers, review copies

    wrong = inventory.wrong_kind(name, "guest", verb)
    if wrong is not None:
        raise wrong


def _load_running(name: str, verb: str) -> Any:
    _check_kind(name, verb)
    instance.reap()
    inst = instance.Instance.load(name)
    if not inst.alive():
        raise VMError(f"instance {name!r} is not running", f"vmctl up --name {name} ...")
    return inst


@verbs.command("exec")
def exec_(
    name: str = typer.Argument(..., help="Instance name."),
    tty: bool = typer.Option(False, "-t", "--tty", help="Run on a pty (interactive programs)."),
) -> None:
    """Run `-- CMD...` in the guest: stdin forwarded, stdout and stderr apart, its exit status."""
    cmd = passthrough()
    if not cmd:
        raise ConfigError("nothing to run", f"vmctl exec {name} -- CMD...")
    chan = _load_running(name, "exec").exec_channel()
    run = terminal.run_tty if tty else terminal.run
    # SystemExit, not typer.Exit: click in non-standalone mode swallows Exit's code.
    raise SystemExit(run(chan, shlex.join(cmd)))


@verbs.command()
def shell(name: str = typer.Argument(..., help="Instance name.")) -> None:
    """An interactive login shell in /workspace as the agent user (like `limactl shell`)."""
    chan = _load_running(name, "shell").exec_channel()
    raise SystemExit(terminal.run_tty(chan, terminal.LOGIN_SHELL))


@verbs.command()
def console(name: str = typer.Argument(..., help="Instance name.")) -> None:
    """Attach to the guest's serial console (Ctrl-] detaches)."""
    inst = _load_running(name, "console")
    ui.info("Ctrl-] detaches")
    if attach(inst.paths.console, name=name) == "closed":
        ui.info(f"{name}'s console closed: the guest is gone")


@verbs.command()
def down(
    name: str = typer.Argument(..., help="Instance name."),
    discard: bool = typer.Option(
        False, "--discard", help="Drop a --review guest's unapplied changes."
    ),
) -> None:
    """Stop a guest: ACPI powerdown, then QMP quit, then kill."""
    _check_kind(name, "down")
    instance.Instance.load(name)  # an unknown name is one error, not a failed "stopping"
    with ui.step(f"stopping {name}"):
        instance.down(name)
    _review_left(name, discard)
