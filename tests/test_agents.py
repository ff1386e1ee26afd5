"""The agent configuration renderer: exact bytes, since guests and Nix compare them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import StubFactory, StubRequest
from vmctl import agents, contract, served
from vmctl.agents import AgentEndpoint
from vmctl.errors import ConfigError

GUEST = AgentEndpoint("http://10.0.2.2:8080/v1", ("smollm2-135m",), None, 8192)

EXPECTED_OPENCODE = """\
{
  "$schema": "https://opencode.ai/config.json",
  "agent": {
    "build": {
      "prompt": "You are a concise assistant. Answer the user directly.",
      "tools": {
        "*": false
      }
    },
    "title": {
      "disable": true
    }
  },
  "autoupdate": false,
  "enabled_providers": [
    "llama"
  ],
  "model": "llama/smollm2-135m",
  "provider": {
    "llama": {
      "models": {
        "smollm2-135m": {
          "limit": {
            "context": 8192,
            "output": 3072
          },
          "name": "smollm2-135m",
          "tool_call": true
        }
      },
      "name": "Local model (vmctl)",
      "npm": "@ai-sdk/openai-compatible",
      "options": {
        "apiKey": "vmctl-local",
        "baseURL": "http://10.0.2.2:8080/v1"
      }
    }
  },
  "share": "disabled",
  "small_model": "llama/smollm2-135m"
}
"""

EXPECTED_YAML = """\
- api_base: http://10.0.2.2:8080/v1
  can_stream: true
  model_id: smollm2-135m
  model_name: smollm2-135m
"""

EXPECTED_ENV = """\
ANTHROPIC_API_KEY=vmctl-local
ANTHROPIC_BASE_URL=http://10.0.2.2:8080
ANTHROPIC_MODEL=smollm2-135m
ANTHROPIC_SMALL_FAST_MODEL=smollm2-135m
BASH_DEFAULT_TIMEOUT_MS=600000
BASH_MAX_TIMEOUT_MS=1800000
CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1
CLAUDE_CODE_DISABLE_THINKING=1
CLAUDE_CODE_MAX_OUTPUT_TOKENS=6144
CLAUDE_CONFIG_DIR=/home/agent/.claude
DISABLE_AUTOUPDATER=1
DISABLE_TELEMETRY=1
OPENAI_API_KEY=vmctl-local
OPENAI_BASE_URL=http://10.0.2.2:8080/v1
OPENCODE_DISABLE_AUTOUPDATE=1
OPENCODE_DISABLE_LSP_DOWNLOAD=1
OPENCODE_DISABLE_MODELS_FETCH=1
OPENCODE_DISABLE_PROJECT_CONFIG=1
OPENCODE_DISABLE_SHARE=1
"""


def test_opencode_json_exact_for_a_small_model() -> None:
    assert agents.opencode_json(GUEST) == EXPECTED_OPENCODE


def test_opencode_large_model_keeps_tools_and_titles_but_stays_local() -> None:
    ep = AgentEndpoint("http://127.0.0.1:8080/v1", ("qwen", "coder"), "k3y", 131072)
    cfg = agents.opencode_config(ep)
    assert "agent" not in cfg
    assert cfg["model"] == cfg["small_model"] == "llama/qwen"
    assert cfg["enabled_providers"] == ["llama"]
    assert cfg["provider"]["llama"]["options"]["apiKey"] == "k3y"
    models = cfg["provider"]["llama"]["models"]
    assert sorted(models) == ["coder", "qwen"]
    assert models["coder"] == {
        "limit": {"context": 131072, "output": 32000},
        "name": "coder",
        "tool_call": True,
    }
    assert (cfg["autoupdate"], cfg["share"]) == (False, "disabled")


def test_tools_stay_on_when_the_context_allows_and_the_caps_follow_it() -> None:
    ep = AgentEndpoint("http://127.0.0.1:8080/v1", ("qwen",), None, 32768)
    assert ep.tools_on("opencode") and ep.tools_on("claude")
    assert agents.context_notice(ep) is None
    assert "agent" not in agents.opencode_config(ep)
    # What the context leaves after each client's request with its tools.
    assert ep.output_tokens("opencode") == (32768 - 8192) // 2
    assert agents.agent_env(ep)["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == str(32768 - 20480)
    settings = agents.claude_settings(ep)
    assert settings["permissions"] == {"defaultMode": "bypassPermissions"}
    assert settings["env"]["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8080"
    assert settings["env"]["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert "CLAUDE_CODE_DISABLE_THINKING" not in settings["env"]


def test_a_small_context_turns_tools_off_loudly_and_names_the_fix() -> None:
    notice = agents.context_notice(GUEST)
    assert notice is not None and "\n" not in notice
    assert "8192" in notice and "32768" in notice and "without tools" in notice
    assert "opencode and Claude Code" in notice and "vmctl serve" in notice
    assert agents.context_notice(GUEST, ("claude",)) == notice.replace("opencode and ", "")
    assert agents.context_notice(GUEST, ("llm", "shell")) is None
    mid = AgentEndpoint("http://127.0.0.1:8080/v1", ("m",), None, 16384)
    assert "Claude Code need" in str(agents.context_notice(mid))
    assert agents.context_notice(mid, ("opencode",)) is None
    assert agents.claude_settings(GUEST)["permissions"]["deny"] == ["*"]
    # Never a cap below what fits: the whole remaining context for Claude Code.
    assert agents.agent_env(GUEST)["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "6144"


def test_unknown_context_sets_no_limit() -> None:
    ep = AgentEndpoint("http://127.0.0.1:8080/v1", ("m",))
    cfg = agents.opencode_config(ep)
    assert cfg["provider"]["llama"]["models"]["m"] == {"name": "m", "tool_call": True}


def test_llm_yaml_exact_and_key_name_only_with_a_key() -> None:
    assert agents.llm_models_yaml(GUEST) == EXPECTED_YAML
    keyed = AgentEndpoint("http://127.0.0.1:8080/v1", ("a", "b"), "secret")
    parsed = yaml.safe_load(agents.llm_models_yaml(keyed))
    assert [e["model_id"] for e in parsed] == ["a", "b"]
    assert all(e["api_key_name"] == agents.LLM_KEY_NAME for e in parsed)
    assert "secret" not in agents.llm_models_yaml(keyed)
    assert agents.llm_default_model(keyed) == "a\n"


def test_env_file_exact() -> None:
    assert agents.env_file(GUEST) == EXPECTED_ENV


@pytest.mark.parametrize(
    ("base_url", "models", "key"),
    [
        ("http://10.0.2.2:8080", ("m",), None),  # no /v1
        ("ftp://10.0.2.2:8080/v1", ("m",), None),
        ("http://10.0.2.2:8080/v1\nX=1", ("m",), None),
        ('http://10.0.2.2:8080/"/v1', ("m",), None),
        ("http://10.0.2.2:8080/v1", (), None),
        ("http://10.0.2.2:8080/v1", ("bad\nid",), None),
        ("http://10.0.2.2:8080/v1", ("m",), 'k"ey'),
        ("http://10.0.2.2:8080/v1", ("m",), "k\ney"),
        ("http://10.0.2.2:8080/v1", ("m",), "$(reboot)"),
    ],
)
def test_hostile_values_are_refused(base_url: str, models: tuple[str, ...], key: str) -> None:
    with pytest.raises(ConfigError):
        AgentEndpoint(base_url, models, key)


def test_guest_files_follow_the_contract() -> None:
    files = agents.guest_files(GUEST)
    assert list(files) == [f.name for f in contract.fw_cfg_files()]
    prefix = "opt/vmctl/"
    assert files[prefix + "opencode.json"] == EXPECTED_OPENCODE.encode()
    assert files[prefix + "llm-models.yaml"] == EXPECTED_YAML.encode()
    assert files[prefix + "llm-default-model.txt"] == b"smollm2-135m\n"
    assert files[prefix + "env"] == EXPECTED_ENV.encode()
    assert all(data.endswith(b"\n") for data in files.values())


def test_module_entry_writes_the_guest_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vmctl.agents", "--model", "smollm2-135m", "--context", "8192"]
    subprocess.run([*cmd, "--out", str(out)], check=True, timeout=60)
    expected = {k.removeprefix("opt/vmctl/"): v for k, v in agents.guest_files(GUEST).items()}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == expected


def _models(req: StubRequest) -> tuple[int, bytes]:
    """/v1/models behind a key, with llama-server's context metadata."""
    if req.headers.get("Authorization") != "Bearer k":
        return 401, b""
    data = [
        {"id": "m1", "meta": {"n_ctx_train": 8192, "n_ctx": 4096}},
        {"id": "m2", "meta": {"n_ctx_train": 32768}},
        {"id": "bad id\n"},
    ]
    return 200, json.dumps({"object": "list", "data": data}).encode()


@pytest.fixture
def models_server(http_stub: StubFactory) -> str:
    return f"{http_stub(_models).url}/v1"


def test_discover_reads_ids_and_the_smallest_context(models_server: str) -> None:
    assert served.discover(models_server, api_key="k") == (("m1", "m2"), 4096)
    assert served.discover(models_server) == ((), None)  # 401 without the key


def test_discover_is_bounded_and_empty_when_nothing_answers() -> None:
    import socket

    with socket.socket() as s:  # accepts connections, never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        start = time.monotonic()
        assert served.discover(url, timeout=0.5) == ((), None)
        assert time.monotonic() - start < 3


def test_codex_config_is_the_local_responses_provider_only() -> None:
    import tomllib

    ep = agents.AgentEndpoint(agents.GUEST_BASE_URL, ("m1",), "k3y", 8192)
    files = agents.guest_files(ep)
    entry = contract.fw_cfg("codex-config.toml")
    assert entry.dest == "/home/agent/.codex/config.toml" and entry.owner == "agent"
    config = tomllib.loads(files[entry.name].decode())
    provider = config["model_providers"][config["model_provider"]]
    assert provider["base_url"] == agents.GUEST_BASE_URL
    assert provider["wire_api"] == "responses"  # Codex's only wire protocol
    # The key is not in the file: Codex reads it from the variable the env file sets.
    assert provider["env_key"] == agents.CODEX_KEY_ENV and "k3y" not in files[entry.name].decode()
    assert f"{agents.CODEX_KEY_ENV}=k3y\n" in files["opt/vmctl/env"].decode()
    assert (config["model"], config["model_context_window"]) == ("m1", 8192)
    assert config["sandbox_mode"] == "danger-full-access"  # vmctl's boundary, not Codex's
    assert config["web_search"] == "disabled" and config["features"]["plugins"] is False
    assert config["analytics"]["enabled"] is False and not config["check_for_update_on_startup"]
