"""The model endpoint a host client is pointed at: found, checked, described.

`vmctl run` talks to `--endpoint URL`, else the running `vmctl serve`
(whose key it then knows), else 127.0.0.1:8080. The endpoint must answer
before anything starts, so a client never launches into a dead port, and
its served models (and context size) shape the client's configuration.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from vmctl import agents
from vmctl.agents import AgentEndpoint
from vmctl.errors import ClientError, ConfigError

DEFAULT_ENDPOINT = "http://127.0.0.1:8080"
REACH_TIMEOUT = 2.0


@dataclass(frozen=True)
class Target:
    """The model endpoint on the host: where it is, its key and models."""

    origin: str  # http://HOST:PORT, no /v1
    host: str
    port: int
    api_key: str | None
    models: tuple[str, ...]
    context: int | None

    def endpoint(self, origin: str | None = None) -> AgentEndpoint:
        """What the client is told (inside a Linux sandbox: its own loopback)."""
        return AgentEndpoint(f"{origin or self.origin}/v1", self.models, self.api_key, self.context)


def _origin(url: str) -> tuple[str, str, int]:
    text = url.strip().rstrip("/")
    text = text.removesuffix("/v1")
    parts = urlsplit(text)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or port < 1:
        raise ConfigError(f"invalid --endpoint {url!r}", "use e.g. http://127.0.0.1:8080")
    return f"{parts.scheme}://{parts.netloc}", parts.hostname, port


def _reachable(origin: str, api_key: str | None) -> bool:
    """Any HTTP answer from /health or /v1/models within the timeout."""
    for path in ("/health", "/v1/models"):
        req = urllib.request.Request(origin + path)
        if api_key:
            req.add_header("Authorization", f"Bearer {api_key}")
        try:
            with urllib.request.urlopen(req, timeout=REACH_TIMEOUT) as resp:
                if resp.status < 500:
                    return True
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return True
        except (OSError, ValueError):
            continue
    return False


def find_endpoint(url: str | None) -> Target:
    """`--endpoint`, else the running `vmctl serve`, else 127.0.0.1:8080; checked."""
    api_key, alias = None, None
    if url is None:
        from vmctl.serve.server import list_servers

        servers = list_servers()
        if len(servers) > 1:
            servers = [s for s in servers if s.port == 8080] or servers[:1]
        if servers:
            url, api_key, alias = servers[0].url, servers[0].api_key, servers[0].alias
    origin, host, port = _origin(url or DEFAULT_ENDPOINT)
    if not _reachable(origin, api_key):
        raise ClientError(
            f"no model endpoint answers at {origin}",
            "start one with `vmctl serve` (or pass --endpoint URL)",
        )
    served, context = agents.discover(origin + "/v1", api_key=api_key)
    models = served or ((alias,) if alias else ())
    if not models:
        raise ClientError(f"{origin}/v1/models lists no model", "is it an OpenAI endpoint?")
    return Target(origin, host, port, api_key, models, context)
