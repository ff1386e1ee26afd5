"""`vmctl serve --max-output`: no client makes the model write more than the ceiling.

The rules are checked as a pure function; the promise against the real,
sandboxed llama-server (the session's server runs with --max-output 256)
through each API a client speaks, asking for far more than the ceiling.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from conftest import BOUNDED, ServedModel, vmctl_cmd
from vmctl.serve import caps

CEILING = int(BOUNDED[1])
RAMBLE = "Count from 1 to 5000, one number per line, and never stop early."


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/chat/completions", "max_tokens"),
        ("/chat/completions?x=1", "max_tokens"),
        ("/v1/completions", "max_tokens"),
        ("/v1/messages", "max_tokens"),
        ("/v1/responses", "max_output_tokens"),
        ("/completion", "n_predict"),
        ("/v1/messages/count_tokens", None),
        ("/v1/models", None),
        ("/tokenize", None),
    ],
)
def test_each_generating_route_has_its_limit_field(path: str, field: str | None) -> None:
    assert caps.route_field(path) == field


def test_limits_are_lowered_or_added_and_small_ones_kept() -> None:
    def capped(body: dict[str, object], field: str = "max_tokens") -> dict[str, object]:
        out = caps.cap(json.dumps(body).encode(), field, 100)
        assert out is not None
        return dict(json.loads(out))

    assert capped({"max_tokens": 5000})["max_tokens"] == 100
    assert capped({"max_tokens": 40})["max_tokens"] == 40
    assert capped({})["max_tokens"] == 100  # Codex sends none
    assert capped({}, "max_output_tokens") == {"max_output_tokens": 100}
    # llama's own "-1: until the context is full", and values of the wrong type.
    both = capped({"n_predict": -1, "max_completion_tokens": "9999", "max_tokens": True})
    assert both == {"n_predict": 100, "max_completion_tokens": 100, "max_tokens": 100}
    body = b'{"max_tokens": 7}'
    assert caps.cap(body, "max_tokens", 100) is body  # untouched bytes when nothing changes
    assert caps.cap(b"not json", "max_tokens", 100) is None
    assert caps.cap(b"[1, 2]", "max_tokens", 100) is None


def _post(served: ServedModel, path: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(
        served.url + path, data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=600) as resp:
        return dict(json.load(resp))


def _written(answer: dict[str, object]) -> int:
    """Tokens the model wrote, in OpenAI's or Anthropic's and the Responses API's words."""
    usage = answer["usage"]
    assert isinstance(usage, dict)
    return int(usage.get("completion_tokens") or usage["output_tokens"])


@pytest.mark.slow
@pytest.mark.llama
def test_a_served_model_never_writes_past_the_ceiling(vmctl_server: ServedModel) -> None:
    # ignore_eos (llama-server's own): the model writes until a limit stops it.
    chat = {"messages": [{"role": "user", "content": RAMBLE}], "ignore_eos": True}
    answers = {
        "chat": _post(vmctl_server, "/v1/chat/completions", chat | {"max_tokens": 4000}),
        "chat-unbounded": _post(vmctl_server, "/v1/chat/completions", chat | {"n_predict": -1}),
        "messages": _post(vmctl_server, "/v1/messages", chat | {"model": "m", "max_tokens": 4000}),
        "responses": _post(
            vmctl_server, "/v1/responses", {"model": "m", "input": RAMBLE, "ignore_eos": True}
        ),
    }
    used = {api: _written(answer) for api, answer in answers.items()}
    assert all(0 < n <= CEILING for n in used.values()), used
    # The ceiling, not the model's own stop, ended them: the bound was exercised.
    assert used["chat"] == used["chat-unbounded"] == CEILING, used


def test_a_bad_ceiling_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    out = subprocess.run(
        vmctl_cmd("serve", "--max-output", "0", "--port", "1"),
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "VMCTL_HOME": str(tmp_path)},
    )  # fmt: skip
    assert out.returncode != 0
    assert "--max-output 0" in out.stderr and "Traceback" not in out.stderr, out.stderr
