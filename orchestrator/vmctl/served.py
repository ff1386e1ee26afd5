"""What a model endpoint says it serves: its model ids and its context.

Asked once before a guest boots or a client starts, so that the agents'
configuration (vmctl.agents) names the served model and sizes requests for
the context it really has. Bounded by a timeout; anything unexpected reads
as "nothing said", and callers fall back to what the user named.
"""

from __future__ import annotations

import json
from typing import Any

from vmctl.agents import MODEL_RE


def _get_json(url: str, api_key: str | None, timeout: float) -> Any:
    """GET url as JSON; urllib.error.URLError is an OSError (imported here: ~15 ms)."""
    import urllib.request

    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read(1 << 20))


def discover(
    base_url: str, *, api_key: str | None = None, timeout: float = 2.0
) -> tuple[tuple[str, ...], int | None]:
    """Models served at `base_url` (GET /v1/models) and their context length.

    Bounded by `timeout`; on any failure the answer is `((), None)` so that
    callers fall back to what the user named. The context is the smallest
    `meta.n_ctx` or `meta.n_ctx_train` llama-server reports, if any.
    """
    try:
        data = _get_json(base_url.rstrip("/") + "/models", api_key, timeout)
    except (OSError, ValueError):
        return (), None
    ids, context = parse_models(data)
    return ids, served_context(base_url, context, api_key=api_key, timeout=timeout)


def served_context(
    base_url: str, context: int | None, *, api_key: str | None = None, timeout: float = 2.0
) -> int | None:
    """`context` lowered to llama-server's per-slot context (`/props`) when it says one."""
    served = _served_context(base_url, api_key, timeout)
    if served is None:
        return context
    return served if context is None else min(context, served)


def parse_models(data: Any) -> tuple[tuple[str, ...], int | None]:
    """Model ids and the smallest context from a parsed `GET /v1/models` answer."""
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return (), None
    ids: list[str] = []
    contexts: list[int] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        mid = entry.get("id")
        if isinstance(mid, str) and MODEL_RE.match(mid) and mid not in ids:
            ids.append(mid)
        meta = entry.get("meta")
        for key in ("n_ctx", "n_ctx_train"):
            n_ctx = meta.get(key) if isinstance(meta, dict) else None
            if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx >= 256:
                contexts.append(n_ctx)
    return tuple(ids), (min(contexts) if contexts else None)


def _served_context(base_url: str, api_key: str | None, timeout: float) -> int | None:
    """llama-server's per-slot context (`/props`), which can be below the trained one."""
    try:
        props = _get_json(base_url.removesuffix("/v1") + "/props", api_key, timeout)
        n_ctx = props["default_generation_settings"]["n_ctx"]
    except (OSError, ValueError, LookupError, TypeError):
        return None
    return (
        n_ctx if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx >= 256 else None
    )
