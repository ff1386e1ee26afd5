"""`vmctl serve`: the sandboxed model server (`stop`, `status`, `rm` are shared verbs)."""

from __future__ import annotations

import json
from typing import Any

import typer

from vmctl import ui
from vmctl.cli.argv import passthrough
from vmctl.errors import ConfigError
from vmctl.models.fetch import resolve_model
from vmctl.serve import server

verbs = typer.Typer()


def _resolve(model: str | None, mmproj: bool) -> Any:
    return resolve_model(model, pull=True, mmproj=mmproj)


def _announce(config: server.ServerConfig, as_json: bool) -> None:
    url = f"http://{config.host}:{config.port}"
    if as_json:
        record: dict[str, object] = {"name": config.name, "url": url, "base_url": f"{url}/v1"}
        record |= {"model": config.alias, "sandbox": config.sandbox}
        print(json.dumps(record), flush=True)
        return
    print(f"serving {config.alias} at {url}/v1 (OpenAI) and {url}/v1/messages (Anthropic)")
    hint = f"audit: vmctl logs {config.name}; stop: Ctrl-C or vmctl stop {config.name}"
    print(f"  name {config.name}; {hint}", flush=True)


@verbs.command(context_settings={"help_option_names": ["-h", "--help"]})
def serve(
    model: str | None = typer.Argument(
        None,
        help="Catalog alias, org/repo:file.gguf, org/repo:QUANT or a path "
        "(default: the embedded smollm2-135m).",
    ),
    port: int = typer.Option(8080, "--port", "-p", help="Gateway port on the host."),
    host: str = typer.Option("127.0.0.1", "--host", help="Gateway address."),
    ctx_size: int | None = typer.Option(
        None, "--ctx-size", "-c", help="Context size (default: the catalog's)."
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="VMCTL_API_KEY", help="Require this key (Bearer or x-api-key)."
    ),
    name: str | None = typer.Option(None, "--name", help="Server name (default serve-PORT)."),
    detach: bool = typer.Option(
        False, "--detach", help="Return once healthy; stop with `vmctl stop NAME`."
    ),
    dash_d: bool = typer.Option(False, "-d", hidden=True),
    no_sandbox: bool = typer.Option(
        False, "--no-sandbox", help="Run llama-server unconfined (loudly warned)."
    ),
    no_mmproj: bool = typer.Option(
        False, "--no-mmproj", help="Do not fetch or load a vision projector."
    ),
    llama_server: str | None = typer.Option(
        None, "--llama-server", help="llama-server binary to use."
    ),
    restart: str = typer.Option(
        "on-failure", "--restart", help="on-failure (with backoff) | no: when llama-server dies."
    ),
    gpu: bool | None = typer.Option(
        None,
        "--gpu/--no-gpu",
        help="Bind the GPU into the sandbox (default: when llama-server is a GPU build).",
    ),
    max_output: int | None = typer.Option(
        None,
        "--max-output",
        help="Cap every reply at this many tokens, whatever the client asks "
        "(default: bounded only by the context).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the endpoint as JSON."),
) -> None:
    """Serve a model with llama-server in a default-deny sandbox, behind an audited gateway.

    Arguments after `--` go to llama-server verbatim.
    """
    if dash_d:
        raise ConfigError("`vmctl serve` has no -d (-d is `vmctl up -d DIR`)", "use --detach")
    if as_json:
        ui.quiet()
    name = name or server.default_name(port)
    server.check_options(name, port, ctx_size, max_output)  # before a model is fetched
    if restart not in ("on-failure", "no"):
        raise ConfigError(f"--restart {restart!r} is not on-failure or no", "--restart on-failure")
    binary = server.find_llama_server(llama_server)
    local = _resolve(model, not no_mmproj)
    config = server.ServerConfig(
        name=name,
        binary=str(binary),
        model_path=str(local.path),
        model_parts=[str(p) for p in local.parts],
        alias=local.alias,
        host=host,
        port=port,
        ctx_size=ctx_size or local.ctx_size,
        mmproj=str(local.mmproj) if local.mmproj else None,
        api_key=api_key,
        sandbox=not no_sandbox,
        restart=restart,
        model_args=list(local.server_args),
        extra_args=passthrough(),
        gpu=list(server.gpu_kinds(binary, gpu)),
        max_output=max_output,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        ui.warn(
            f"--host {host} without --api-key: anyone who can reach this address can use the model"
        )
    if detach:
        server.launch_detached(config)
        _announce(config, as_json)
        return
    # Here, not at the top: the supervisor brings aiohttp and the gateway, measured at
    # +150 ms CPU on every `vmctl` start-up (`vmctl --help` 480 ms instead of 330 ms).
    from vmctl.serve import supervisor

    supervisor.run_foreground(config, on_ready=lambda c: _announce(c, as_json))
