"""Benchmark `vmctl serve`: what the gateway and the sandbox cost, side by side.

One run starts two real servers of the embedded model (sandboxed and
`--no-sandbox`), then alternates identical streamed requests:

- gateway_ratio: generation tokens/s through the gateway / straight on the
  server's UNIX socket (target >= 0.97)
- sandbox_ratio: tokens/s sandboxed / unsandboxed, both via their gateways
  (target >= 0.97)
- ttft_ratio: time to first token through the gateway / direct (target <= 1.05)
- serve_to_healthy_s: seconds from `vmctl serve --detach` to healthy

The gateway's own ceiling, against a stand-in llama-server that streams as
fast as it can (no model; tests/standin_llama.py), side by side in one run:

- ceiling_chunks_ratio: SSE events/s through the gateway / straight on the
  stand-in's socket (target >= 0.95)
- ttfb_added_median_ms, ttfb_added_p99_ms: time to the first response byte,
  through the gateway minus direct (target median <= 0.5 ms)
- guest_conn_kb: host memory (sidecar + gateway RSS) per held guest
  connection, connections handed over as QEMU's guestfwd does (target <= 2048)

Rates are measured at the client, from the arrival of the first to the last
streamed token, with prompt caching off and a fixed token count, and
alternated (ABAB...) so drift on a busy machine hits both sides alike.
Usage: .venv/bin/python bench/serve.py [--rounds N] [--tokens N] [--gpu] [--ceiling-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

PROMPT = "Write a short story about a lighthouse keeper and a storm."


@dataclass
class Sample:
    ttft: float
    tokens_per_s: float


async def stream_once(session: aiohttp.ClientSession, url: str, tokens: int) -> Sample:
    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": False,
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    async with session.post(url, json=body) as r:
        r.raise_for_status()
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            choices = event.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                arrivals.append(time.perf_counter())
    if len(arrivals) < 2:
        raise RuntimeError(f"too few tokens streamed from {url}")
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    return Sample(arrivals[0] - start, rate)


def vmctl(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VMCTL_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "vmctl", *args], env=env, capture_output=True, text=True, check=True
    )


def start(home: Path, name: str, port: int, *extra: str) -> float:
    t0 = time.perf_counter()
    vmctl(home, "serve", "--detach", "--json", "--name", name, "--port", str(port), *extra)
    return time.perf_counter() - t0


async def measure(home: Path, rounds: int, tokens: int) -> dict[str, float]:
    sock = home / "servers" / "sbx" / "run" / "llama.sock"
    gw = "http://127.0.0.1:18181/v1/chat/completions"
    nosbx = "http://127.0.0.1:18182/v1/chat/completions"
    direct_url = "http://llama/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=600)
    async with (
        aiohttp.ClientSession(timeout=timeout) as tcp,
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(sock)), timeout=timeout) as unix,
    ):
        for warm in (stream_once(tcp, gw, 16), stream_once(tcp, nosbx, 16)):
            await warm
        via_gw, direct, unsandboxed = [], [], []
        for _ in range(rounds):
            via_gw.append(await stream_once(tcp, gw, tokens))
            direct.append(await stream_once(unix, direct_url, tokens))
            unsandboxed.append(await stream_once(tcp, nosbx, tokens))

    def med(samples: list[Sample], attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in samples)

    return {
        "gateway_ratio": med(via_gw, "tokens_per_s") / med(direct, "tokens_per_s"),
        "sandbox_ratio": med(via_gw, "tokens_per_s") / med(unsandboxed, "tokens_per_s"),
        "ttft_ratio": med(via_gw, "ttft") / med(direct, "ttft"),
        "gateway_tokens_per_s": med(via_gw, "tokens_per_s"),
        "direct_tokens_per_s": med(direct, "tokens_per_s"),
        "unsandboxed_tokens_per_s": med(unsandboxed, "tokens_per_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--ceiling-only", action="store_true", help="No model: the gateway only.")
    parser.add_argument(
        "--gpu", action="store_true", help="serve with --gpu (a GPU build of llama-server)"
    )
    args = parser.parse_args()
    from ceiling import ceiling

    with tempfile.TemporaryDirectory(prefix="vc") as tmp:
        for key, value in ceiling(Path(tmp), args.rounds).items():
            print(f"{key}={value:.3f}", flush=True)
    if args.ceiling_only:
        return
    gpu = ("--gpu",) if args.gpu else ()
    with tempfile.TemporaryDirectory(prefix="vb") as tmp:
        home = Path(tmp)
        try:
            healthy = start(home, "sbx", 18181, *gpu)
            start(home, "nosbx", 18182, "--no-sandbox", *gpu)
            results = asyncio.run(measure(home, args.rounds, args.tokens))
        finally:
            for name in ("sbx", "nosbx"):
                subprocess.run(
                    [sys.executable, "-m", "vmctl", "stop", name],
                    env={**os.environ, "VMCTL_HOME": str(home)},
                    capture_output=True,
                    check=False,
                )
    results["serve_to_healthy_s"] = healthy
    for key, value in results.items():
        print(f"{key}={value:.3f}")


if __name__ == "__main__":
    main()
