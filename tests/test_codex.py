"""Codex's tool loop, under `vmctl run codex`, through vmctl's gateway.

Codex speaks only the Responses API. A scripted stand-in plays the model
on a UNIX socket behind the real gateway (with a key, which Codex must send
from the environment vmctl gives it): first a `function_call` to Codex's
`exec_command` tool, then, once the call's output comes back, a final
message. The test asserts what the user cares about: the workspace changed
as scripted, both requests are audited, and the second carried the tool's
result. The real llama-server path is test_clients.py's
`test_codex_answers_through_the_gateway` (a 135M model cannot call tools).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from conftest import free_port, need
from vmctl import events
from vmctl.clients import registry as clients
from vmctl.serve.gateway import Gateway, GatewayConfig

KEY = "codex-k3y"
SCRIPT = "mkdir -p notes && echo written-by-codex > notes/new.txt && echo appended >> README.txt"


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n".encode()


def _turn(item: dict[str, Any]) -> bytes:
    """One streamed Responses turn producing `item`, as Codex expects it."""
    start = {**item, "status": "in_progress"}
    start |= {"arguments": ""} if item["type"] == "function_call" else {"content": []}
    done = {"id": "resp_1", "object": "response", "status": "completed", "output": [item]}
    done["usage"] = {"input_tokens": 12, "output_tokens": 3, "total_tokens": 15}
    return b"".join(
        [
            _sse("response.created", {"response": {"id": "resp_1", "status": "in_progress"}}),
            _sse("response.output_item.added", {"output_index": 0, "item": start}),
            _sse("response.output_item.done", {"output_index": 0, "item": item}),
            _sse("response.completed", {"response": done}),
        ]
    )


class StandIn:
    """The scripted model: a tool call first, a final message after its output."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stand-in"}]})

    async def responses(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        kinds = [i.get("type") for i in body.get("input", [])]
        if "function_call_output" not in kinds:
            args = json.dumps({"cmd": SCRIPT})
            item = {"type": "function_call", "id": "fc_1", "call_id": "call_1",
                    "name": "exec_command", "arguments": args, "status": "completed"}  # fmt: skip
        else:
            text = {"type": "output_text", "text": "done", "annotations": []}
            item = {"type": "message", "id": "msg_1", "role": "assistant",
                    "status": "completed", "content": [text]}  # fmt: skip
        return web.Response(body=_turn(item), content_type="text/event-stream")


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[str, Path, StandIn]]:
    stand_in = StandIn()
    app = web.Application()
    app.router.add_get("/v1/models", stand_in.models)
    app.router.add_post("/v1/responses", stand_in.responses)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "model.sock"
    await web.UnixSite(runner, str(sock)).start()
    port = free_port()
    audit = tmp_path / "events"  # the gateway's event folder (one file per caller)
    gw = Gateway(GatewayConfig("127.0.0.1", port, sock, audit, api_key=KEY, alias="stand-in"))
    await gw.start()
    try:
        yield f"http://127.0.0.1:{port}", audit, stand_in
    finally:
        await gw.close()
        await runner.cleanup()


async def test_codex_runs_a_tool_that_changes_the_workspace(
    gateway: tuple[str, Path, StandIn], workspace: Path, bwrap_bin: Path
) -> None:
    try:
        clients.get("codex").find(None)
    except Exception:
        need(False, "codex not installed (scripts/install-agents.sh)")
    url, audit, stand_in = gateway
    (workspace / "README.txt").write_text("made by the host\n")
    argv = ["run", "codex", "-w", str(workspace), "--endpoint", url, "--api-key", KEY,
            "--", "exec", "--skip-git-repo-check", "Take notes."]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vmctl", *argv, env=os.environ.copy(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=240)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert (workspace / "notes" / "new.txt").read_text() == "written-by-codex\n"
    assert (workspace / "README.txt").read_text() == "made by the host\nappended\n"
    assert out.decode().strip().endswith("done")
    lines = [json.loads(e.to_json()) for e in events.read_all(sorted(audit.glob("*.jsonl")))]
    posts = [(r["path"], r["status"]) for r in lines if r.get("method") == "POST"]
    assert posts == [("/v1/responses", 200), ("/v1/responses", 200)]
    first, second = stand_in.requests
    assert first["stream"] is True and {"exec_command"} <= {t.get("name") for t in first["tools"]}
    assert not any(t.get("type") == "web_search" for t in first["tools"])  # off in vmctl's config
    result = next(i for i in second["input"] if i.get("type") == "function_call_output")
    assert result["call_id"] == "call_1" and "exited with code 0" in result["output"]
