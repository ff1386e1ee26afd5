"""One renderer of agent configuration, for guests and host clients alike.

The guest (fw_cfg files) and `vmctl run` (a client's private state folder)
both describe the same thing: one local OpenAI/Anthropic-compatible
endpoint and the model(s) it serves. Rendering it in one place keeps the
rules in one place: a local provider only, the small model local too (no
session titles to a hosted service), autoupdate and sharing off. Output is
deterministic (sorted keys, trailing newline) so tests and the Nix smoke
test compare exact bytes.

    python -m vmctl.agents --base-url http://10.0.2.2:8080/v1 --model ID --out DIR
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vmctl import budget, contract
from vmctl.errors import ConfigError

#: The model as a guest sees it under `--net model` (the guest contract's address).
GUEST_BASE_URL = "http://{model_host}:{model_port}/v1".format(**contract.raw()["network"])
#: What clients send when the endpoint has no key (they all insist on one).
DUMMY_API_KEY = "vmctl-local"
#: The name `llm keys set` stores the key under, when there is one.
LLM_KEY_NAME = "vmctl"
OPENCODE_SCHEMA = "https://opencode.ai/config.json"
#: Claude Code's switches for network use vmctl never wants (field notes).
CLAUDE_OFFLINE_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
}
#: Claude Code's Bash tool gives up after 2 minutes by default; under TCG an
#: `npm install` or a build takes longer, and the agent then sees a failure.
CLAUDE_TOOL_ENV = {"BASH_DEFAULT_TIMEOUT_MS": "600000", "BASH_MAX_TIMEOUT_MS": "1800000"}
PROVIDER = "llama"
TINY_PROMPT = "You are a concise assistant. Answer the user directly."
#: opencode's switches for network use vmctl never wants (field notes).
OPENCODE_ENV = {
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    # An opencode.json in the workspace would override vmctl's provider.
    "OPENCODE_DISABLE_PROJECT_CONFIG": "1",
    "OPENCODE_DISABLE_SHARE": "1",
}

MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+/@-]{0,127}$")
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,512}$")
_ENV_VALUE_RE = re.compile(r"^[^\n\r\"'\\`$\x00]*$")


@dataclass(frozen=True)
class AgentEndpoint:
    """The endpoint as the agent sees it.

    `base_url` ends with `/v1` (what OpenAI clients want); `context` is the
    model's context length when known, which decides how much of a
    client's default request must be trimmed for it to fit.
    """

    base_url: str
    models: tuple[str, ...]
    api_key: str | None = None
    context: int | None = None

    def __post_init__(self) -> None:
        check_base_url(self.base_url)
        if not self.models:
            raise ConfigError("no model to configure", "pass --model or start `vmctl serve`")
        for m in self.models:
            if not MODEL_RE.match(m):
                raise ConfigError(f"invalid model id {m!r}", "use letters, digits and ._:+/@-")
        if self.api_key is not None and not (
            _KEY_RE.match(self.api_key) and _ENV_VALUE_RE.match(self.api_key)
        ):
            raise ConfigError("invalid API key", "use printable ASCII without spaces or quotes")
        if self.context is not None and self.context < 256:
            raise ConfigError(f"context {self.context} is too small", "use at least 256 tokens")

    @property
    def model(self) -> str:
        """The default model: the first one served."""
        return self.models[0]

    @property
    def key(self) -> str:
        """The key clients send: the real one, or a dummy they accept."""
        return self.api_key or DUMMY_API_KEY

    @property
    def origin(self) -> str:
        """`scheme://host:port` without `/v1` (Anthropic clients add it)."""
        return self.base_url[: -len("/v1")]

    def tools_on(self, client: str) -> bool:
        """Whether `client`'s request with its tools fits the served context."""
        return budget.tools_on(self.context, client)

    def output_tokens(self, client: str) -> int | None:
        """`client`'s output cap, from the served context (vmctl.budget)."""
        return budget.output_tokens(self.context, client)


def check_base_url(url: str) -> str:
    """Refuse anything but `http(s)://host[:port]/.../v1` with no odd characters."""
    parts = urlsplit(url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or not url.endswith("/v1")
        or parts.query
        or parts.fragment
        or parts.username
        or not _ENV_VALUE_RE.match(url)
        or any(c.isspace() for c in url)
    ):
        raise ConfigError(f"invalid endpoint URL {url!r}", "use e.g. http://127.0.0.1:8080/v1")
    return url


def opencode_config(ep: AgentEndpoint) -> dict[str, Any]:
    """opencode.json: the local provider only, every model local."""
    models: dict[str, Any] = {}
    for m in ep.models:
        entry: dict[str, Any] = {"name": m, "tool_call": True}
        output = ep.output_tokens("opencode")
        if ep.context is not None and output is not None:
            entry["limit"] = {"context": ep.context, "output": output}
        models[m] = entry
    config: dict[str, Any] = {
        "$schema": OPENCODE_SCHEMA,
        "autoupdate": False,
        "enabled_providers": [PROVIDER],
        "model": f"{PROVIDER}/{ep.model}",
        "provider": {
            PROVIDER: {
                "models": models,
                "name": "Local model (vmctl)",
                "npm": "@ai-sdk/openai-compatible",
                "options": {"apiKey": ep.key, "baseURL": ep.base_url},
            }
        },
        "share": "disabled",
        "small_model": f"{PROVIDER}/{ep.model}",
    }
    if not ep.tools_on("opencode"):
        # Loud, not silent: context_notice() says so at up/run/status.
        config["agent"] = {
            "build": {"prompt": TINY_PROMPT, "tools": {"*": False}},
            "title": {"disable": True},
        }
    return config


def context_notice(
    ep: AgentEndpoint, clients: tuple[str, ...] = ("opencode", "claude")
) -> str | None:
    """One line when the served context turns `clients`' tools off, naming the fix."""
    return budget.notice(ep.context, clients)


def opencode_json(ep: AgentEndpoint) -> str:
    return json.dumps(opencode_config(ep), indent=2, sort_keys=True) + "\n"


def llm_models_yaml(ep: AgentEndpoint) -> str:
    """simonw llm's extra-openai-models.yaml, one entry per served model."""
    entries: list[dict[str, Any]] = []
    for m in ep.models:
        entry: dict[str, Any] = {
            "model_id": m,
            "model_name": m,
            "api_base": ep.base_url,
            "can_stream": True,
        }
        if ep.api_key:
            entry["api_key_name"] = LLM_KEY_NAME
        entries.append(entry)
    import yaml  # here: ~15 ms to import, for llm's file only

    text: str = yaml.safe_dump(entries, sort_keys=True, default_flow_style=False)
    return text


def llm_default_model(ep: AgentEndpoint) -> str:
    return ep.model + "\n"


#: The variable Codex reads its key from (`env_key`); agent_env sets it.
CODEX_KEY_ENV = "OPENAI_API_KEY"


def codex_config_toml(ep: AgentEndpoint) -> str:
    """Codex's config.toml: the local model over the Responses API, nothing else.

    Codex speaks only `/v1/responses`. Its own sandbox is off because the
    boundary is vmctl's (the guest, or the host profile); web search,
    plugins and apps are off (plugins resolve github.com at start-up),
    and so are update checks, analytics, feedback and history.
    Strings are JSON-quoted, which TOML reads as basic strings.
    """
    q = json.dumps
    lines = [
        "# Written by vmctl: the local model only, offline.",
        f"model = {q(ep.model)}",
        f"model_provider = {q(PROVIDER)}",
        'approval_policy = "never"',
        'sandbox_mode = "danger-full-access"',
        "check_for_update_on_startup = false",
        'web_search = "disabled"',
    ]
    if ep.context is not None:
        lines.append(f"model_context_window = {ep.context}")
    lines += [
        "",
        f"[model_providers.{PROVIDER}]",
        f"name = {q('Local model (vmctl)')}",
        f"base_url = {q(ep.base_url)}",
        f"env_key = {q(CODEX_KEY_ENV)}",
        'wire_api = "responses"',
        "request_max_retries = 1",
        "stream_max_retries = 1",
        # A CPU model can take minutes on a first long prompt before its first byte.
        "stream_idle_timeout_ms = 900000",
        "",
        "[features]",
        "plugins = false",
        "apps = false",
        "",
        "[analytics]",
        "enabled = false",
        "",
        "[feedback]",
        "enabled = false",
        "",
        "[history]",
        'persistence = "none"',
    ]
    return "\n".join(lines) + "\n"


def agent_env(ep: AgentEndpoint) -> dict[str, str]:
    """Variables that point OpenAI, Anthropic and opencode clients at `ep`."""
    env = {
        "OPENAI_BASE_URL": ep.base_url,
        "OPENAI_API_KEY": ep.key,
        # Claude Code appends /v1/messages itself.
        "ANTHROPIC_BASE_URL": ep.origin,
        "ANTHROPIC_API_KEY": ep.key,
        "ANTHROPIC_MODEL": ep.model,
        "ANTHROPIC_SMALL_FAST_MODEL": ep.model,
        **CLAUDE_OFFLINE_ENV,
        **CLAUDE_TOOL_ENV,
        **OPENCODE_ENV,
    }
    output = ep.output_tokens("claude")
    if output is not None:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(output)
    if not ep.tools_on("claude"):
        env["CLAUDE_CODE_DISABLE_THINKING"] = "1"
    return env


def claude_settings(ep: AgentEndpoint) -> dict[str, Any]:
    """Claude Code's settings.json: the endpoint (its own `env`) and no prompts.

    Permissions are bypassed because the guest or the sandbox is the
    boundary ("let the agent go wild"); with too small a context every tool
    is denied, which removes them from its requests (context_notice says so).
    """
    env = {
        k: v
        for k, v in agent_env(ep).items()
        if k.startswith(("ANTHROPIC_", "CLAUDE_")) or k in CLAUDE_TOOL_ENV
    }
    permissions: dict[str, Any] = {"defaultMode": "bypassPermissions"}
    if not ep.tools_on("claude"):
        permissions["deny"] = ["*"]
    return {
        "env": env | CLAUDE_OFFLINE_ENV,
        "includeCoAuthoredBy": False,
        "permissions": permissions,
        "skipDangerousModePermissionPrompt": True,
    }


def claude_state(ep: AgentEndpoint) -> dict[str, Any]:
    """Claude Code's .claude.json: first-run questions answered, the key accepted."""
    return {
        "bypassPermissionsModeAccepted": True,
        "customApiKeyResponses": {"approved": [ep.key[-20:]], "rejected": []},
        "hasCompletedOnboarding": True,
    }


def json_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def proxy_env(proxy_url: str, no_proxy: str) -> dict[str, str]:
    """The egress proxy for npm, pip, git, curl and wget (some read only lower case)."""
    env: dict[str, str] = {}
    for key, value in (
        ("HTTP_PROXY", proxy_url),
        ("HTTPS_PROXY", proxy_url),
        ("NO_PROXY", no_proxy),
    ):
        env[key] = env[key.lower()] = value
    return env


def guest_proxy_env() -> dict[str, str]:
    """The guest's proxy at the contract's address; the model is reached directly."""
    net = contract.raw()["network"]
    url = f"http://{net['model_host']}:{net['proxy_port']}"
    return proxy_env(url, f"{net['model_host']},localhost,127.0.0.1")


def env_file(ep: AgentEndpoint, extra: dict[str, str] | None = None) -> str:
    """KEY=VALUE lines, sorted; values never hold newlines, quotes or `$`.

    For the guest: Claude Code's folder is where the contract puts its files.
    """
    lines = []
    claude_dir = str(Path(contract.fw_cfg("claude-settings.json").dest).parent)
    env = agent_env(ep) | {"CLAUDE_CONFIG_DIR": claude_dir} | (extra or {})
    for key, value in sorted(env.items()):
        if not _ENV_VALUE_RE.match(value):
            raise ConfigError(f"unsafe value for {key}", "remove quotes, newlines and '$'")
        lines.append(f"{key}={value}\n")
    return "".join(lines)


def guest_files(ep: AgentEndpoint, *, proxy: bool = False) -> dict[str, bytes]:
    """The fw_cfg payloads, keyed by the contract's names (`opt/vmctl/...`).

    With `proxy`, the env file also points HTTP(S)_PROXY at the egress proxy.
    """
    prefix = contract.raw()["fw_cfg"]["prefix"]
    rendered = {
        "opencode.json": opencode_json(ep),
        "llm-models.yaml": llm_models_yaml(ep),
        "llm-default-model.txt": llm_default_model(ep),
        "env": env_file(ep, guest_proxy_env() if proxy else None),
        "codex-config.toml": codex_config_toml(ep),
        "claude-settings.json": json_text(claude_settings(ep)),
        "claude.json": json_text(claude_state(ep)),
    }
    files: dict[str, bytes] = {}
    for f in contract.fw_cfg_files():
        short = f.name.removeprefix(prefix)
        if short not in rendered:
            raise KeyError(f"no renderer for fw_cfg file {f.name}")
        files[f.name] = rendered[short].encode()
    return files


def with_base_url(ep: AgentEndpoint, base_url: str) -> AgentEndpoint:
    """The same models and key, seen at another address (host vs guest)."""
    return replace(ep, base_url=base_url)


def main(argv: list[str] | None = None) -> int:
    """Write the guest files into a folder (the Nix smoke test's expectations)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m vmctl.agents", description=main.__doc__)
    p.add_argument("--base-url", default=GUEST_BASE_URL)
    p.add_argument("--model", action="append", required=True, help="repeat for several")
    p.add_argument("--api-key")
    p.add_argument("--context", type=int)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        ep = AgentEndpoint(a.base_url, tuple(a.model), a.api_key, a.context)
        files = guest_files(ep)
    except ConfigError as e:
        print(f"error: {e.message} ({e.hint})", file=sys.stderr)
        return 2
    prefix = contract.raw()["fw_cfg"]["prefix"]
    a.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (a.out / name.removeprefix(prefix)).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
