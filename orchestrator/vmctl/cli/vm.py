"""`vmctl up`, `exec`, `shell`, `console`, `status`, `down`: guests, thinly.

Parsing and rendering only; the lifecycle lives in vmctl.instance. Heavy
modules are imported inside the verbs so `vmctl exec` starts fast.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import typer

from vmctl import ui
from vmctl.cli import app, passthrough
from vmctl.errors import ConfigError, VMError

DEFAULT_ENDPOINT = "127.0.0.1:8080"


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `with Instance`, so cleanup runs


def _workspace(path: Path) -> Path:
    try:
        from vmctl.sandbox.launch import check_workspace
    except ImportError:  # pragma: no cover - sandbox.py ships with vmctl
        real = path.expanduser().resolve()
        if not real.is_dir():
            raise ConfigError(f"workspace {path} is not a folder", "pass -d DIR") from None
        return real
    try:
        return check_workspace(path)
    except ConfigError as e:
        raise ConfigError(e.message, "pass a project folder with -d DIR") from None


def _running_server() -> tuple[str, str | None, str | None] | None:
    """(HOST:PORT, model id, api key) of a `vmctl serve` server, if one runs."""
    try:
        from vmctl.serve.server import list_servers
    except ImportError:
        return None
    for srv in list_servers():
        return f"{srv.host}:{srv.port}", srv.alias, srv.api_key
    return None


def _plan_model(
    endpoint: str | None, model: str | None, net: str | None, proxy_env: bool = False
) -> tuple[str | None, str, dict[str, bytes], list[str]]:
    """Endpoint, network policy, fw_cfg agent files and notices, saying what was chosen.

    `proxy_env`: the env file points HTTP(S)_PROXY at the egress proxy
    (balanced, open); under locked nothing but the model is meant to be
    reached, so tools are not sent to the proxy (busybox wget, for one,
    ignores NO_PROXY and would ask the proxy for the model).
    """
    from vmctl import agents
    from vmctl.vm.qemu import parse_endpoint

    api_key = None
    server = None if endpoint else _running_server()
    if server:
        endpoint, served, api_key = server
        model = model or served
        ui.info(f"model endpoint: {endpoint} (vmctl serve)")
    if endpoint is None and net in ("model", "full"):
        endpoint = DEFAULT_ENDPOINT
    if net is None:
        net = "model" if endpoint else "none"
        why = f"model endpoint {endpoint} known" if endpoint else "no model endpoint known"
        ui.info(f"network: {net} ({why}; choose with --net)")
    if endpoint is None or net == "none":
        return endpoint, net, {}, []
    host, port = parse_endpoint(endpoint)
    probe = f"http://{host}:{port}/v1"
    guest_host = "10.0.2.2" if net == "model" or host in ("127.0.0.1", "localhost") else host
    guest_port = 8080 if net == "model" else port
    base = f"http://{guest_host}:{guest_port}/v1"
    ep = agents.endpoint(base, probe_url=probe, models=(model,) if model else (), api_key=api_key)
    if server and net == "model":
        # The guest's sidecar route is authenticated by who the guest is: no key inside.
        ep = dataclasses.replace(ep, api_key=None)
    notice = agents.context_notice(ep)
    if notice:
        ui.warn(notice)
    files = agents.guest_files(ep, proxy=proxy_env and net == "model")
    return endpoint, net, files, [notice] if notice else []


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
        return "model", policy
    return net, None


def _image(
    image: str, with_agents: list[str] | None, flake: str | None, config: str | None
) -> tuple[Any, str]:
    from vmctl.images import manifest as images
    from vmctl.images import nixos

    if image == "auto":
        reason = nixos.nix_available(flake)
        image = "micro" if reason else "nixos"
        ui.info(f"image: {image}" + (f" ({reason})" if reason else " (Nix can build it here)"))
    agents = tuple(with_agents) if with_agents else None
    return images.resolve_image(image, agents, flake=flake, config=config), image


@app.command(context_settings={"allow_extra_args": False})
def up(
    directory: Path = typer.Option(..., "-d", "--dir", help="The one host folder the guest sees."),
    ephemeral: bool = typer.Option(False, "--ephemeral", help="Remove everything at exit."),
    name: str | None = typer.Option(None, "--name", help="Instance name (default: generated)."),
    image: str = typer.Option("auto", "--image", help="auto | micro | nixos | PATH."),
    with_agents: list[str] = typer.Option(
        [], "--with", help="micro: agents the image must carry (opencode, claude, llm)."
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
) -> None:
    """Boot a guest that sees DIR at /workspace (QEMU arguments after `--`)."""
    from vmctl import paths
    from vmctl.vm import accel as accel_mod
    from vmctl.vm import instance
    from vmctl.vm.qemu import InstanceSpec, parse_endpoint, parse_forward

    signal.signal(signal.SIGTERM, _sigterm)
    instance.reap()
    ws = _workspace(directory)
    accel_mod.qemu_binary()  # a missing QEMU is reported before any image work
    name = name or _new_name()
    net, preset = _net_policy(net, policy)
    endpoint, net, files, notices = _plan_model(
        model_endpoint, model, net, proxy_env=preset not in (None, "locked")
    )
    if net == "model":
        preset = preset or "locked"
    elif resolve:
        raise ConfigError("--resolve needs the egress proxy", "use --policy or --net model")
    shared = _review_copy(name, ws) if review else ws
    spec = InstanceSpec(
        name=name,
        workspace=shared,
        net=net,
        policy=preset,
        resolve=tuple(resolve),
        model_endpoint=parse_endpoint(endpoint) if endpoint and net != "none" else None,
        forwards=tuple(parse_forward(p) for p in publish),
        mem=mem,
        cpus=cpus,
        accel=accel,
        ephemeral=ephemeral,
        extra_args=tuple(passthrough()),
        fw_cfg=tuple(files),
        mirror=not no_mirror,
    )
    try:
        manifest, image_name = _image(image, with_agents, flake, config)
        inst = instance.up(
            spec,
            manifest,
            image=image_name,
            fwcfg=files,
            timeout=timeout,
            detach=detach,
            notices=notices,
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
    from vmctl.errors import NotFoundError
    from vmctl.review import snapshot
    from vmctl.vm import instance

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
    from vmctl.review import changes, snapshot

    if not snapshot.exists(name):
        return
    pending = changes.changes(snapshot.load(name))
    if discard:
        snapshot.discard(name, len(pending))
        print(f"{name}: review copy discarded ({len(pending)} unapplied change(s) dropped)")
        return
    if not pending:
        snapshot.drop(name)
        return
    print(
        f"{name}: {len(pending)} unapplied change(s) kept in its review copy until "
        f"`vmctl apply {name}` or `vmctl rm {name}` (see `vmctl diff {name}`)"
    )


def _foreground(inst: Any) -> None:
    """Attach the console on a TTY, else wait for the guest to power off."""
    from vmctl.vm.console import attach

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
    from vmctl import paths

    while True:
        name = f"vm-{secrets.token_hex(3)}"
        if not paths.instance(name).root.exists():
            return name


def _load_running(name: str) -> Any:
    from vmctl.vm import instance

    instance.reap()
    inst = instance.Instance.load(name)
    if not inst.alive():
        raise VMError(f"instance {name!r} is not running", f"vmctl up --name {name} ...")
    return inst


@app.command("exec")
def exec_(
    name: str = typer.Argument(..., help="Instance name."),
    tty: bool = typer.Option(False, "-t", "--tty", help="Run on a pty (interactive programs)."),
) -> None:
    """Run `-- CMD...` in the guest: stdin forwarded, stdout and stderr apart, its exit status."""
    import shlex

    from vmctl.vm import terminal

    cmd = passthrough()
    if not cmd:
        raise ConfigError("nothing to run", f"vmctl exec {name} -- CMD...")
    chan = _load_running(name).exec_channel()
    run = terminal.run_tty if tty else terminal.run
    # SystemExit, not typer.Exit: click in non-standalone mode swallows Exit's code.
    raise SystemExit(run(chan, shlex.join(cmd)))


@app.command()
def shell(name: str = typer.Argument(..., help="Instance name.")) -> None:
    """An interactive login shell in /workspace as the agent user (like `limactl shell`)."""
    from vmctl.vm import terminal

    chan = _load_running(name).exec_channel()
    raise SystemExit(terminal.run_tty(chan, terminal.LOGIN_SHELL))


@app.command()
def console(name: str = typer.Argument(..., help="Instance name.")) -> None:
    """Attach to the guest's serial console (Ctrl-] detaches)."""
    from vmctl.vm.console import attach

    inst = _load_running(name)
    ui.info("Ctrl-] detaches")
    if attach(inst.paths.console, name=name) == "closed":
        ui.info(f"{name}'s console closed: the guest is gone")


@app.command()
def status(
    name: str = typer.Argument(..., help="Instance name."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """QMP run state, pid, uptime, network policy and forwards."""
    from vmctl.vm import instance

    instance.reap()
    data = instance.status(name)
    from vmctl.review import snapshot

    if snapshot.exists(name):
        data["review"] = f"{snapshot.load(name).source} (vmctl diff {name}; vmctl apply {name})"
    if as_json:
        print(json.dumps(data, indent=2))
        return
    keys = ("name", "state", "pid", "uptime_s", "net", "policy", "model_endpoint", "forwards")
    for key in (*keys, "review"):
        value = data.get(key)
        if key == "review" and value is None:
            continue
        print(f"{key:15} {', '.join(value) if isinstance(value, list) else value}")
    print(f"{'mirror':15} {_mirror_line(data['mirror'])}")
    print(f"{'workspace':15} {data['workspace']}\n{'console log':15} {data['console_log']}")
    for notice in data.get("notices", []):
        print(f"{'notice':15} {notice}")


def _mirror_line(m: dict[str, Any]) -> str:
    from vmctl.events import safe

    if m["state"] == "off":
        return f"off ({m['why']})"
    live = ", ".join(f"127.0.0.1:{p}" for p in m["live"]) or "no ports yet"
    skipped = "; ".join(f"{p} skipped: {safe(why)}" for p, why in m["skipped"].items())
    return f"on: {live}" + (f" ({skipped})" if skipped else "")


@app.command()
def down(
    name: str = typer.Argument(..., help="Instance name."),
    discard: bool = typer.Option(
        False, "--discard", help="Drop a --review guest's unapplied changes."
    ),
) -> None:
    """Stop a guest: ACPI powerdown, then QMP quit, then kill."""
    from vmctl.vm import instance

    with ui.step(f"stopping {name}"):
        instance.down(name)
    _review_left(name, discard)
