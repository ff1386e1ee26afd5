"""The scripted stand-in model, checked with the real OpenAI and Anthropic SDKs.

The end-to-end tests trust it to speak both APIs the way real clients
parse them; these tests make the SDKs themselves the judges.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import anthropic
import openai
import pytest

from fakes.scripted_model import FINAL_TEXT, TITLE_TEXT, Script, ScriptedModel

OPENCODE_TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": schema}}
    for name, schema in {
        "read": {"properties": {"filePath": {"type": "string"}}, "required": ["filePath"]},
        "edit": {
            "properties": {k: {"type": "string"} for k in ("filePath", "oldString", "newString")},
            "required": ["filePath", "oldString", "newString"],
        },
        "write": {"properties": {"filePath": {}, "content": {}}, "required": ["content"]},
        "bash": {
            "properties": {"command": {"type": "string"}, "description": {"type": "string"}},
            "required": ["command", "description"],
        },
        "glob": {"properties": {"pattern": {}}},
    }.items()
]
CLAUDE_TOOLS = [
    {"name": name, "input_schema": {"type": "object", "properties": props}}
    for name, props in {
        "Read": {"file_path": {}},
        "Edit": {"file_path": {}, "old_string": {}, "new_string": {}},
        "Write": {"file_path": {}, "content": {}},
        "Bash": {"command": {}},
        "WebFetch": {"url": {}},
    }.items()
]


@pytest.fixture
def model() -> Iterator[ScriptedModel]:
    with ScriptedModel(Script(root="/w")) as m:
        yield m


def test_openai_clients_get_each_step_in_opencodes_spelling(model: ScriptedModel) -> None:
    client = openai.OpenAI(base_url=f"{model.url}/v1", api_key="k", max_retries=0)
    messages: list[dict[str, object]] = [{"role": "user", "content": "go"}]
    title = client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    assert title.choices[0].message.content == TITLE_TEXT
    calls = []
    for step in range(5):
        stream = step % 2 == 1
        kwargs = {"model": "m", "messages": messages, "tools": OPENCODE_TOOLS}
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            tool_calls = [t for d in deltas for t in (d.tool_calls or [])]
            text = "".join(d.content or "" for d in deltas)
        else:
            msg = client.chat.completions.create(**kwargs).choices[0].message  # type: ignore[call-overload]
            tool_calls, text = msg.tool_calls or [], msg.content or ""
        if not tool_calls:
            assert text == FINAL_TEXT
            break
        (call,) = tool_calls
        calls.append((call.function.name, json.loads(call.function.arguments)))
        fn = {"name": call.function.name, "arguments": call.function.arguments}
        messages += [
            {
                "role": "assistant",
                "tool_calls": [{"id": call.id, "type": "function", "function": fn}],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "ok"},
        ]
    assert calls == [
        ("read", {"filePath": "/w/notes.txt"}),
        ("edit", {"filePath": "/w/notes.txt", "oldString": "status: draft",
                  "newString": "status: final"}),
        ("write", {"filePath": "/w/made/by-agent/hello.py", "content": 'print("hi")\n'}),
        ("bash", {"command": "cd /w && echo $((6*7)) > made/by-agent/answer.txt",
                  "description": "scripted step"}),
    ]  # fmt: skip
    assert model.tool_calls() == ["read", "edit", "write", "bash"]


def test_anthropic_clients_get_each_step_in_claude_codes_spelling(model: ScriptedModel) -> None:
    client = anthropic.Anthropic(base_url=model.url, api_key="k", max_retries=0)
    messages: list[dict[str, object]] = [{"role": "user", "content": "go"}]
    names = []
    for step in range(5):
        kwargs = {"model": "m", "max_tokens": 100, "messages": messages, "tools": CLAUDE_TOOLS}
        if step % 2:
            with client.messages.stream(**kwargs) as s:  # type: ignore[arg-type]
                reply = s.get_final_message()
        else:
            reply = client.messages.create(**kwargs)  # type: ignore[call-overload]
        uses = [b for b in reply.content if b.type == "tool_use"]
        if not uses:
            assert reply.stop_reason == "end_turn" and reply.content[0].text == FINAL_TEXT
            break
        assert reply.stop_reason == "tool_use"
        names.append(uses[0].name)
        if uses[0].name == "Write":
            assert uses[0].input == {
                "file_path": "/w/made/by-agent/hello.py",
                "content": 'print("hi")\n',
            }
        messages += [
            {"role": "assistant", "content": [u.model_dump() for u in uses]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                          "content": "ok"}]},
        ]  # fmt: skip
    assert names == ["Read", "Edit", "Write", "Bash"]
    plain = client.messages.create(
        model="m", max_tokens=10, messages=[{"role": "user", "content": "t"}]
    )
    assert plain.content[0].text == TITLE_TEXT  # type: ignore[union-attr]


def test_metadata_routes_and_the_record(model: ScriptedModel) -> None:
    models = json.load(urllib.request.urlopen(f"{model.url}/v1/models", timeout=5))
    assert models["data"][0]["id"] == "scripted-model"
    assert models["data"][0]["meta"]["n_ctx_train"] == model.context
    head = urllib.request.Request(model.url + "/", method="HEAD")
    assert urllib.request.urlopen(head, timeout=5).status == 200
    assert [(r.method, r.path) for r in model.requests] == [("GET", "/v1/models"), ("HEAD", "/")]


def test_the_script_knows_the_workspace_it_expects(tmp_path: object) -> None:
    from pathlib import Path

    ws = Path(str(tmp_path))
    script = Script(root=str(ws))
    script.seed(ws)
    assert (ws / "notes.txt").read_text() == "# notes\nstatus: draft\n"
    assert script.expected()["notes.txt"] == "# notes\nstatus: final\n"
    assert script.expected()["made/by-agent/answer.txt"] == "42\n"
