"""The model endpoint, chosen one way for `vmctl up` and `vmctl run`.

Both verbs ask the same three questions, answered here and only here:

1. Which endpoint? `--endpoint URL` (or `HOST:PORT`) names one; else
   `--server NAME` picks a running `vmctl serve`; else the one running
   server is used; several running servers without `--server` is an error
   that lists them (guessing would send a prompt to the wrong model).
2. Which key? A vmctl server's own key, read from its state folder (0700,
   parsed strictly, never from the workspace), so the user never types it;
   for any other endpoint `--api-key` or `VMCTL_API_KEY`.
3. Does it answer, with that key? A 401 is "this endpoint needs a key"
   (or "refused the key") with the fix, never "lists no model".

The guest's view (`http://10.0.2.2:8080/v1`) comes from the guest contract.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from vmctl import agents, contract, paths, served, ui
from vmctl.agents import AgentEndpoint
from vmctl.errors import ClientError, ConfigError, NotFoundError
from vmctl.serve.server import ServerInfo, list_servers

DEFAULT_ENDPOINT = "http://127.0.0.1:8080"
ENV_KEY = "VMCTL_API_KEY"
REACH_TIMEOUT = 2.0
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,512}$")
_KEY_HINT = f"pass --api-key KEY or set {ENV_KEY} (a vmctl server's own key is found by itself)"


@dataclass(frozen=True)
class Located:
    """An endpoint and its key, before anything is asked over the network."""

    origin: str  # http://HOST:PORT, no /v1
    host: str
    port: int
    api_key: str | None
    server: str | None = None  # the vmctl server listening there, if any
    alias: str | None = None  # that server's model id

    @property
    def where(self) -> str:
        return f"vmctl server {self.server} ({self.origin})" if self.server else self.origin


@dataclass(frozen=True)
class Target(Located):
    """An endpoint that answered: its models and context length."""

    models: tuple[str, ...] = ()
    context: int | None = None

    def endpoint(self, origin: str | None = None) -> AgentEndpoint:
        """What a host client is told (inside a Linux sandbox: its own loopback)."""
        return AgentEndpoint(f"{origin or self.origin}/v1", self.models, self.api_key, self.context)


def guest_origin(host: str, port: int, net: str) -> str:
    """Where a guest reaches the endpoint `host:port` under a network policy.

    `model`: the contract's address, which the guestfwd relay carries to
    host:port. `full`: SLiRP's host address (the same 10.0.2.2) stands for
    the host's loopback; any other host is reached directly.
    """
    net_contract = contract.raw()["network"]
    model_host = str(net_contract["model_host"])
    if net == "model":
        return f"http://{model_host}:{int(net_contract['model_port'])}"
    return f"http://{model_host if host in LOOPBACK else host}:{port}"


def parse_origin(value: str, option: str = "--endpoint") -> tuple[str, str, int]:
    """`http(s)://HOST:PORT[/v1]` or `HOST:PORT` -> (origin, host, port)."""
    text = value.strip().rstrip("/").removesuffix("/v1")
    bare = "://" not in text  # HOST:PORT: the port is not optional (`nope` is a typo, not :80)
    if bare:
        text = "http://" + text
    parts = urlsplit(text)
    try:
        port = parts.port or (-1 if bare else 443 if parts.scheme == "https" else 80)
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or port < 1:
        raise ConfigError(
            f"invalid {option} {value!r}", "use HOST:PORT or a URL, e.g. 127.0.0.1:8080"
        )
    host = parts.hostname
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}", host, port


def running_servers() -> list[ServerInfo]:
    """Running `vmctl serve` servers (their owner lists them; dead ones are reaped)."""
    return list_servers()


def choose_server(name: str | None) -> ServerInfo | None:
    """`--server NAME`, else the one running server, else None; several is an error."""
    servers = running_servers()
    listing = ", ".join(f"{s.name} ({s.url})" for s in servers)
    if name is not None:
        for s in servers:
            if s.name == name:
                return s
        hint = f"running: {listing}" if servers else f"start it: vmctl serve --name {name}"
        raise NotFoundError(f"no running vmctl server named {name!r}", hint)
    if len(servers) > 1:
        raise ConfigError(
            f"{len(servers)} vmctl servers are running: {listing}",
            "choose one with --server NAME",
        )
    return servers[0] if servers else None


def _server_at(host: str, port: int) -> ServerInfo | None:
    """The running vmctl server whose gateway listens on host:port, if any."""
    for s in running_servers():
        same_host = s.host == host or (s.host in LOOPBACK and host in LOOPBACK)
        if s.port == port and (same_host or s.host in ("0.0.0.0", "::")):
            return s
    return None


def server_key(info: ServerInfo) -> str | None:
    """A vmctl server's key, trusted only from a private state folder.

    The folder must be ours and 0700, server.json ours and not writable by
    others, the key printable ASCII: anything else is refused, not used.
    """
    if info.api_key is None:
        return None
    sp = paths.server(info.name)
    uid = os.getuid()
    for path, mode in ((sp.root, 0o077), (sp.meta, 0o022)):
        try:
            st = os.lstat(path)
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from e
        if stat.S_ISLNK(st.st_mode) or st.st_uid != uid or st.st_mode & mode:
            raise ConfigError(
                f"refusing the key of server {info.name}: {path} is not private to you",
                f"chmod 700 {sp.root}; chmod 600 {sp.meta}",
            )
    if not _KEY_RE.match(info.api_key):
        raise ConfigError(f"server {info.name} has a malformed key in {sp.meta}")
    return info.api_key


def user_key(api_key: str | None) -> str | None:
    """`--api-key`, else VMCTL_API_KEY; checked like any key."""
    key = api_key if api_key is not None else os.environ.get(ENV_KEY)
    if not key:
        return None
    if not _KEY_RE.match(key):
        raise ConfigError("invalid --api-key / VMCTL_API_KEY", "use printable ASCII, no spaces")
    return key


def locate(
    url: str | None = None,
    *,
    server: str | None = None,
    api_key: str | None = None,
    option: str = "--endpoint",
) -> Located | None:
    """Which endpoint and key, without asking the network; None: none known."""
    if url is not None and server is not None:
        raise ConfigError(f"{option} and --server both name an endpoint", "pass one of them")
    if url is not None:
        origin, host, port = parse_origin(url, option)
        info = _server_at(host, port)
    else:
        info = choose_server(server)
        if info is None:
            return None
        origin, host, port = parse_origin(info.url)
    key = server_key(info) if info is not None else None
    given = user_key(api_key)
    name = info.name if info is not None else None
    if key and given and given != key:
        ui.warn(f"the key given is not used: vmctl server {name} has its own")
    return Located(
        origin=origin,
        host=host,
        port=port,
        api_key=key or given,
        server=name,
        alias=info.alias if info is not None else None,
    )


def _get(url: str, api_key: str | None) -> tuple[int, Any]:
    """(HTTP status, parsed JSON or None); OSError when nothing answers."""
    import urllib.error  # here: ~25 ms that a guest without a model never needs
    import urllib.request

    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=REACH_TIMEOUT) as resp:
            raw = resp.read(1 << 20)
            status = int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def _refused(loc: Located) -> ClientError:
    if loc.api_key is None:
        return ClientError(f"{loc.where} needs an API key (HTTP 401)", _KEY_HINT)
    if loc.server is not None:
        return ClientError(
            f"{loc.where} refused the key in its own state (HTTP 401)",
            f"restart it: vmctl stop {loc.server}, then vmctl serve --api-key KEY",
        )
    hint = f"check --api-key / {ENV_KEY}"
    return ClientError(f"{loc.origin} refused the API key (HTTP 401)", hint)


def probe(loc: Located) -> tuple[tuple[str, ...], int | None] | None:
    """(models, context) the endpoint lists; None when nothing answers.

    A 401/403 raises ("needs a key" or "refused the key"), so a keyed
    endpoint is never reported as one that serves no model.
    """
    try:
        status, data = _get(loc.origin + "/v1/models", loc.api_key)
    except (OSError, ValueError):
        try:
            status, data = _get(loc.origin + "/health", None)
        except (OSError, ValueError):
            return None
        if status >= 500:
            return None
        return (), None
    if status in (401, 403):
        raise _refused(loc)
    if status >= 500:
        return None
    if status != 200:
        return (), None
    ids, context = served.parse_models(data)
    # llama-server's per-slot context can be below the trained one it lists.
    return ids, served.served_context(loc.origin + "/v1", context, api_key=loc.api_key)


def find_endpoint(
    url: str | None = None, *, server: str | None = None, api_key: str | None = None
) -> Target:
    """`vmctl run`'s endpoint: chosen as `locate` says, else 127.0.0.1:8080; must answer."""
    loc = locate(url, server=server, api_key=api_key)
    if loc is None:
        origin, host, port = parse_origin(DEFAULT_ENDPOINT)
        loc = Located(origin, host, port, user_key(api_key))
    found = probe(loc)
    if found is None:
        raise ClientError(
            f"no model endpoint answers at {loc.origin}",
            "start one with `vmctl serve` (or pass --endpoint URL)",
        )
    served, context = found
    models = served or ((loc.alias,) if loc.alias else ())
    if not models:
        raise ClientError(f"{loc.origin}/v1/models lists no model", "is it an OpenAI endpoint?")
    return Target(**_fields(loc), models=models, context=context)


def _fields(loc: Located) -> dict[str, Any]:
    return {k: getattr(loc, k) for k in Located.__dataclass_fields__}


@dataclass(frozen=True)
class GuestPlan:
    """What `vmctl up` decided about the model: policy, host endpoint, fw_cfg files."""

    net: str
    endpoint: tuple[str, int] | None  # HOST:PORT the guest's relay (or SLiRP) reaches
    files: dict[str, bytes]
    #: Lines `vmctl up` said that `vmctl status` repeats (agents' tools off, ...).
    notices: tuple[str, ...] = ()


def plan_guest(
    url: str | None = None,
    *,
    server: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    net: str | None = None,
    proxy_env: bool = False,
) -> GuestPlan:
    """`vmctl up`'s endpoint, chosen as `vmctl run`'s is, seen from the guest.

    Unlike `run`, a silent endpoint is accepted when `--model` names the
    model (the server may start after the guest); a keyed one never is.
    `proxy_env`: the guest's env file points HTTP(S)_PROXY at the egress
    proxy (agents.guest_files), only ever under `--net model`.
    """
    loc = locate(url, server=server, api_key=api_key, option="--model-endpoint")
    if loc is not None and loc.server is not None:
        ui.info(f"model endpoint: {loc.where}" + (", with its key" if loc.api_key else ""))
    if loc is None and net in ("model", "full"):
        origin, host, port = parse_origin(DEFAULT_ENDPOINT)
        loc = Located(origin, host, port, user_key(api_key))
    if net is None:
        net = "model" if loc else "none"
        why = f"model endpoint {loc.origin} known" if loc else "no model endpoint known"
        ui.info(f"network: {net} ({why}; choose with --net)")
    if loc is None or net == "none":
        return GuestPlan(net, None, {})
    if not loc.origin.startswith("http://"):
        raise ConfigError("--model-endpoint must be plain http", "e.g. 127.0.0.1:8080")
    found = probe(loc)
    served, context = found or ((), None)
    models = served or ((model,) if model else ()) or ((loc.alias,) if loc.alias else ())
    if not models:
        said = "does not answer" if found is None else "lists no model"
        raise ConfigError(
            f"no model to configure: {loc.origin} {said}", "start `vmctl serve`, or pass --model ID"
        )
    base = guest_origin(loc.host, loc.port, net) + "/v1"
    # A vmctl server is reached through the guest's sidecar route, which the
    # gateway authenticates by who the guest is: no key goes into the guest.
    key = None if loc.server is not None and net == "model" else loc.api_key
    ep = AgentEndpoint(base, models, key, context)
    notice = agents.context_notice(ep)
    if notice:
        ui.warn(notice)
    files = agents.guest_files(ep, proxy=proxy_env and net == "model")
    return GuestPlan(net, (loc.host, loc.port), files, (notice,) if notice else ())
