"""A scripted stand-in model: OpenAI chat completions and Anthropic Messages.

A 135M-parameter model cannot drive an agent's tools reliably; this server
can. It answers every request that offers tools with the next step of one
fixed script, adapted to the tool names and argument schemas the client
actually offered (opencode: `read`/`edit`/`write`/`bash` with `filePath`,
`oldString`...; Claude Code: `Read`/`Edit`/`Write`/`Bash` with `file_path`,
`old_string`...):

    1. read   ROOT/notes.txt
    2. edit   ROOT/notes.txt: "status: draft" -> "status: final"
    3. write  ROOT/made/by-agent/hello.py (a new file in a new folder)
    4. bash   cd ROOT && echo $((6*7)) > made/by-agent/answer.txt
    5. a final text message

The step is the number of tool-calling assistant turns already in the
conversation, so the server is stateless per conversation and a client's
retry gets the same answer. Requests without tools (titles, topic checks)
get plain text. Every request is recorded (`requests`, and one JSON line
per request in `log` when given). Streamed (SSE) and plain answers alike.

    PYTHONPATH=tests python -m fakes.scripted_model --root /workspace [--port 0]

prints `port N` once listening, then serves until killed.
"""

from __future__ import annotations

import argparse
import http.server
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakes import scripted_chat as chat
from fakes import scripted_responses as responses

MODEL = "scripted-model"
CONTEXT = 65536
FINAL_TEXT = "Done: read notes.txt, set it final, wrote hello.py, ran the shell step."
TITLE_TEXT = "Scripted session"

#: What each step is called in the clients this project drives.
TOOL_NAMES = {
    "read": ("read", "Read", "read_file"),
    "edit": ("edit", "Edit", "edit_file"),
    "write": ("write", "Write", "write_file"),
    "bash": ("bash", "Bash", "shell"),
    "job": ("exec_command",),  # Codex: its only tool for all of it
}
#: Argument names for each role, in the clients' spellings.
ARG_NAMES = {
    "path": ("filePath", "file_path", "path"),
    "old": ("oldString", "old_string"),
    "new": ("newString", "new_string"),
    "content": ("content",),
    "command": ("command",),
    "cmd": ("cmd",),
}


@dataclass(frozen=True)
class Script:
    """The fixed job, as paths the agent sees (`root` is its workspace)."""

    root: str = "/workspace"
    note: str = "notes.txt"
    old: str = "status: draft"
    new: str = "status: final"
    new_file: str = "made/by-agent/hello.py"
    new_content: str = 'print("hi")\n'
    answer_file: str = "made/by-agent/answer.txt"

    def steps(self) -> list[tuple[str, dict[str, str]]]:
        """(kind, roles) for each tool step, in order."""
        root = self.root.rstrip("/")
        return [
            ("read", {"path": f"{root}/{self.note}"}),
            ("edit", {"path": f"{root}/{self.note}", "old": self.old, "new": self.new}),
            ("write", {"path": f"{root}/{self.new_file}", "content": self.new_content}),
            ("bash", {"command": f"cd {root} && echo $((6*7)) > {self.answer_file}"}),
        ]

    def shell_job(self) -> str:
        """The same job as one shell command, for an agent whose only tool is a shell."""
        root = self.root.rstrip("/")
        folder = self.new_file.rsplit("/", 1)[0]
        content = self.new_content.replace("\n", "\\n").replace('"', '\\"')
        return (
            f"cd {root} && sed -i 's/{self.old}/{self.new}/' {self.note}"
            f' && mkdir -p {folder} && printf "{content}" > {self.new_file}'
            f" && echo $((6*7)) > {self.answer_file}"
        )

    def seed(self, workspace: Path) -> None:
        """The files the script expects before the agent starts."""
        (workspace / self.note).write_text(f"# notes\n{self.old}\n")

    def expected(self) -> dict[str, str]:
        """Every file of the workspace after the job, relative path -> text."""
        return {
            self.note: f"# notes\n{self.new}\n",
            self.new_file: self.new_content,
            self.answer_file: "42\n",
        }


@dataclass
class Recorded:
    """One request the stand-in answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    answer: str  # "tool:NAME", "text", "meta"


def _tools(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Offered tool name -> its JSON schema, for either API's shape."""
    found: dict[str, dict[str, Any]] = {}
    for tool in body.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function") if tool.get("type") == "function" else None
        if isinstance(fn, dict):
            found[str(fn.get("name"))] = fn.get("parameters") or {}
        elif "name" in tool:
            # Anthropic's `input_schema`; the Responses API's flat `parameters`.
            found[str(tool["name"])] = tool.get("input_schema") or tool.get("parameters") or {}
    return found


def _done_steps(body: dict[str, Any]) -> int:
    """Assistant turns that called a tool: the step this request is at."""
    n = 0
    for msg in body.get("messages") or []:
        if not isinstance(msg, dict) or msg.get("role") != "assistant":
            continue
        content = msg.get("content")
        blocks = content if isinstance(content, list) else []
        if msg.get("tool_calls") or any(
            isinstance(b, dict) and b.get("type") == "tool_use" for b in blocks
        ):
            n += 1
    return n


def _arguments(schema: dict[str, Any], roles: dict[str, str]) -> dict[str, Any]:
    """The step's values under the names the schema uses; other required fields filled."""
    props = schema.get("properties") or {}
    args: dict[str, Any] = {}
    for role, value in roles.items():
        name = next((n for n in ARG_NAMES[role] if n in props), ARG_NAMES[role][0])
        args[name] = value
    for name in schema.get("required") or []:
        if name not in args:
            kind = (props.get(name) or {}).get("type")
            args[name] = {"boolean": False, "integer": 0, "number": 0}.get(
                str(kind), "scripted step"
            )
    return args


def plan_answer(script: Script, body: dict[str, Any]) -> tuple[str, dict[str, Any]] | str:
    """(tool name, arguments) for a tool step, else the text to answer."""
    tools = _tools(body)
    if not tools:
        return TITLE_TEXT
    steps = script.steps()
    n = _done_steps(body)
    if "exec_command" in tools and not any(t in tools for t in TOOL_NAMES["write"]):
        steps, n = [("job", {"cmd": script.shell_job()})], responses.done_steps(body)
    if n >= len(steps):
        return FINAL_TEXT
    kind, roles = steps[n]
    name = next((t for t in TOOL_NAMES[kind] if t in tools), None)
    if name is None:
        return f"(no {kind} tool offered: {', '.join(sorted(tools))})"
    return name, _arguments(tools[name], roles)


@dataclass
class ScriptedModel:
    """The server: start() on a loopback port, close() when done."""

    script: Script = field(default_factory=Script)
    host: str = "127.0.0.1"
    port: int = 0
    model: str = MODEL
    context: int = CONTEXT
    log: Path | None = None
    requests: list[Recorded] = field(default_factory=list)

    def start(self) -> ScriptedModel:
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer((self.host, self.port), _handler(self))
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ScriptedModel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tool_calls(self) -> list[str]:
        """The tool names answered, in order (e.g. ['read', 'edit', 'write', 'bash'])."""
        return [
            r.answer.removeprefix("tool:") for r in self.requests if r.answer.startswith("tool:")
        ]

    def tool_results(self) -> list[str]:
        """What the agent reported back for each tool call, from its latest request.

        Shown when a scripted job is not done: it says why a step failed
        (a tool's error, a timeout) where the agent's own output does not.
        """
        if not self.requests:
            return []
        found: list[str] = []
        for msg in self.requests[-1].body.get("messages") or []:
            if not isinstance(msg, dict):
                continue
            if msg.get("role") == "tool":
                found.append(str(msg.get("content"))[:500])
            content = msg.get("content")
            for block in content if isinstance(content, list) else []:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    found.append(json.dumps(block.get("content"))[:500])
        return found + responses.tool_outputs(self.requests[-1].body)

    def record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)
            if self.log is not None:
                line = {"method": rec.method, "path": rec.path, "answer": rec.answer}
                line["tools"] = sorted(_tools(rec.body))
                line["bytes"] = len(json.dumps(rec.body))
                with self.log.open("a") as f:
                    f.write(json.dumps(line) + "\n")

    def models(self) -> dict[str, Any]:
        meta = {"n_ctx": self.context, "n_ctx_train": self.context}
        entry = {"id": self.model, "object": "model", "owned_by": "scripted", "meta": meta}
        return {"object": "list", "data": [entry]}


def _handler(owner: ScriptedModel) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # each answer ends when the connection closes

        def log_message(self, *args: object) -> None:
            pass

        def _body(self) -> dict[str, Any]:
            length = min(int(self.headers.get("Content-Length") or 0), 16 << 20)
            raw = self.rfile.read(length) if length else b""
            try:
                data = json.loads(raw) if raw else {}
            except ValueError:
                data = {}
            return data if isinstance(data, dict) else {}

        def _json(self, status: int, data: dict[str, Any]) -> None:
            payload = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _sse(self, events: Iterator[bytes]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            for event in events:
                self.wfile.write(event)
                self.wfile.flush()

        def _record(self, body: dict[str, Any], answer: str) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            owner.record(Recorded(self.command, self.path, headers, body, answer))

        def do_HEAD(self) -> None:
            self._record({}, "meta")
            self._json(200, {})

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            self._record({}, "meta")
            if path in ("/v1/models", "/models"):
                self._json(200, owner.models())
            elif path == "/props":
                self._json(200, {"default_generation_settings": {"n_ctx": owner.context}})
            elif path in ("/health", "/v1/health", "/"):
                self._json(200, {"status": "ok"})
            else:
                self._json(404, {"error": {"message": f"no route {path}"}})

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            body = self._body()
            if path.endswith("/messages/count_tokens"):
                self._record(body, "meta")
                self._json(200, {"input_tokens": len(json.dumps(body)) // 4})
                return
            if path not in ("/v1/chat/completions", "/v1/messages", "/v1/responses"):
                self._record(body, "meta")
                self._json(404, {"error": {"message": f"no route {path}"}})
                return
            plan = plan_answer(owner.script, body)
            self._record(body, "text" if isinstance(plan, str) else f"tool:{plan[0]}")
            model = str(body.get("model") or owner.model)
            if path == "/v1/responses":
                response = responses.answer(plan, model)
                if body.get("stream"):
                    self._sse(responses.events(response))
                else:
                    self._json(200, response)
            elif path == "/v1/chat/completions":
                answer = chat.openai_answer(plan, model)
                if body.get("stream"):
                    self._sse(chat.openai_chunks(answer))
                else:
                    self._json(200, answer)
            else:
                message = chat.anthropic_answer(plan, model)
                if body.get("stream"):
                    self._sse(chat.anthropic_events(message))
                else:
                    self._json(200, message)

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fakes.scripted_model", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--root", default="/workspace", help="the workspace as the agent sees it")
    p.add_argument("--context", type=int, default=CONTEXT)
    p.add_argument("--log", type=Path, help="append one JSON line per request here")
    a = p.parse_args(argv)
    server = ScriptedModel(Script(root=a.root), a.host, a.port, context=a.context, log=a.log)
    server.start()
    print(f"port {server.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
