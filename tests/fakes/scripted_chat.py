"""The scripted stand-in's answers as OpenAI chat completions and Anthropic Messages.

A plan is the next tool call `(name, arguments)` or the final text
(fakes.scripted_model decides it); these shape it for each API, plain or
as SSE events, as opencode, Claude Code and `llm` read them. The Responses
API (Codex) is in fakes.scripted_responses.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

_ids = itertools.count(1)


def _id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):06d}"


def openai_answer(plan: tuple[str, dict[str, Any]] | str, model: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": None}
    if isinstance(plan, str):
        msg["content"], reason = plan, "stop"
    else:
        call = {"name": plan[0], "arguments": json.dumps(plan[1])}
        msg["tool_calls"] = [{"id": _id("call"), "type": "function", "function": call}]
        reason = "tool_calls"
    return {
        "id": _id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": msg, "finish_reason": reason}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
    }


def openai_chunks(answer: dict[str, Any]) -> Iterator[bytes]:
    """The same answer as chat.completion.chunk SSE events."""
    choice = answer["choices"][0]
    delta = {"role": "assistant", **{k: v for k, v in choice["message"].items() if v is not None}}
    for call in delta.get("tool_calls", []):
        call["index"] = 0
    base = {k: answer[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    events = [
        base | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        base | {"choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]},
        base | {"choices": [], "usage": answer["usage"]},
    ]
    for event in events:
        yield b"data: " + json.dumps(event).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


def anthropic_answer(plan: tuple[str, dict[str, Any]] | str, model: str) -> dict[str, Any]:
    if isinstance(plan, str):
        content: list[dict[str, Any]] = [{"type": "text", "text": plan}]
        reason = "end_turn"
    else:
        content = [{"type": "tool_use", "id": _id("toolu"), "name": plan[0], "input": plan[1]}]
        reason = "tool_use"
    return {
        "id": _id("msg"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 10},
    }


def anthropic_events(answer: dict[str, Any]) -> Iterator[bytes]:
    """The same answer as Messages SSE events."""
    start = answer | {"content": [], "stop_reason": None}
    start["usage"] = {"input_tokens": 10, "output_tokens": 1}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for i, block in enumerate(answer["content"]):
        if block["type"] == "text":
            first = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            first = block | {"input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        events += [
            {"type": "content_block_start", "index": i, "content_block": first},
            {"type": "content_block_delta", "index": i, "delta": delta},
            {"type": "content_block_stop", "index": i},
        ]
    events += [
        {
            "type": "message_delta",
            "delta": {"stop_reason": answer["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": 10},
        },
        {"type": "message_stop"},
    ]
    for event in events:
        yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
