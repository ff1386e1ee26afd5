"""The scripted stand-in's answers in OpenAI's Responses API (Codex's only API).

Codex sends every turn streamed and needs, per turn, the output item added
and done (a `message` or a `function_call`) and `response.completed`;
without the last it retries the turn (docs/codex.md). Codex offers no
read/edit/write tools, only `exec_command`, so the stand-in gives it the
whole scripted job as one shell command (`Script.shell_job`).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

_ids = itertools.count(1)


def done_steps(body: dict[str, Any]) -> int:
    """Function calls already made in this conversation: the step it is at."""
    items = body.get("input")
    return sum(
        1 for i in items if isinstance(i, dict) and i.get("type") == "function_call"
    ) if isinstance(items, list) else 0  # fmt: skip


def tool_outputs(body: dict[str, Any]) -> list[str]:
    """What the agent sent back for each call (shown when a job is not done)."""
    items = body.get("input")
    return [
        str(i.get("output"))[:500]
        for i in (items if isinstance(items, list) else [])
        if isinstance(i, dict) and i.get("type") == "function_call_output"
    ]


def answer(plan: tuple[str, dict[str, Any]] | str, model: str) -> dict[str, Any]:
    """The finished `response` object for a tool call or a final text."""
    n = next(_ids)
    item: dict[str, Any]
    if isinstance(plan, str):
        text = {"type": "output_text", "text": plan, "annotations": []}
        item = {"type": "message", "id": f"msg_{n:06d}", "role": "assistant",
                "status": "completed", "content": [text]}  # fmt: skip
    else:
        item = {"type": "function_call", "id": f"fc_{n:06d}", "call_id": f"call_{n:06d}",
                "name": plan[0], "arguments": json.dumps(plan[1]),
                "status": "completed"}  # fmt: skip
    return {
        "id": f"resp_{n:06d}",
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": "completed",
        "output": [item],
        "usage": {"input_tokens": 10, "output_tokens": 10, "total_tokens": 20},
    }


def events(response: dict[str, Any]) -> Iterator[bytes]:
    """The same answer as the streamed events Codex reads."""
    item = response["output"][0]
    start = {**item, "status": "in_progress"}
    start |= {"arguments": ""} if item["type"] == "function_call" else {"content": []}
    created = {**response, "status": "in_progress", "output": []}
    sequence: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": created}),
        ("response.output_item.added", {"output_index": 0, "item": start}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        ("response.completed", {"response": response}),
    ]
    for kind, data in sequence:
        yield f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()
