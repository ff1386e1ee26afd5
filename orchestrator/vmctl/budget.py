"""How much of the served context each agent's request takes: tools and caps.

An agent's default request (system prompt plus its tool schemas) must fit
the context the model is served with, with room left to answer; a request
that does not fit is an HTTP 400 from llama-server. So the served context
decides, per client, whether its tools stay on and how large an answer it
may ask for. vmctl never turns tools off silently: `notice` is the one line
`vmctl up`, `vmctl run` and `vmctl status` show, naming the fix.
"""

from __future__ import annotations

#: The served context each client's tools need (field notes: opencode's
#: request is ~7.7k tokens with its 10 tools, Claude Code's ~19k with 24).
TOOLS_CONTEXT = {"opencode": 16384, "claude": 32768}
#: Tokens a client's request takes with its tools, and with them off.
PROMPT_TOKENS = {"opencode": 8192, "claude": 20480}
TRIMMED_PROMPT_TOKENS = 2048
#: The clients' own default output cap; vmctl never sets a higher one.
MAX_OUTPUT_TOKENS = 32000
MIN_OUTPUT_TOKENS = 256
LABELS = {"opencode": "opencode", "claude": "Claude Code"}
#: A catalog model whose context holds every agent's tools.
LARGER_MODEL = "qwen3.5-35b-a3b"


def tools_on(context: int | None, client: str) -> bool:
    """Whether `client`'s request with its tools fits (unknown context: assume so)."""
    return context is None or client not in TOOLS_CONTEXT or context >= TOOLS_CONTEXT[client]


def output_tokens(context: int | None, client: str) -> int | None:
    """`client`'s output cap: what the context leaves after its request.

    None when the context is unknown (the client's default stands).
    opencode keeps half of that room for the conversation to grow (it
    compacts once input exceeds context minus output); Claude Code gets it
    all, so no reply fails on a cap vmctl chose.
    """
    if context is None:
        return None
    used = PROMPT_TOKENS[client] if tools_on(context, client) else TRIMMED_PROMPT_TOKENS
    room = context - used
    if client == "opencode":
        room //= 2
    return max(MIN_OUTPUT_TOKENS, min(MAX_OUTPUT_TOKENS, room))


def notice(context: int | None, clients: tuple[str, ...] = ("opencode", "claude")) -> str | None:
    """One line when the served context turns `clients`' tools off, naming the fix."""
    off = [c for c in clients if c in TOOLS_CONTEXT and not tools_on(context, c)]
    if not off:
        return None
    need = max(TOOLS_CONTEXT[c] for c in off)
    names = " and ".join(LABELS[c] for c in off)
    return (
        f"the model's context ({context} tokens) is below the {need} {names} need for "
        f"tools: they run without tools (text answers only); fix: serve a model with "
        f"a larger context, e.g. `vmctl serve {LARGER_MODEL} --ctx-size {need}`"
    )
