"""What does continuous batching buy? Aggregate tokens/s of `tunelab serve` with 16 concurrent clients,
relative to the same 16 requests sent one at a time, and the time to first token.

The server runs as a user would run it (`tunelab serve`, a subprocess on a free local port, the bundled
model); the clients stream chat completions through httpx so the first token's arrival can be timed.
Every request asks for the same number of tokens from a prompt that does not end early, so both phases
decode the same work. Ends with one JSON line: ``{"speedup": ..., "ttft_ms": ...}`` (``ttft_ms``: median
time to first token under 16 concurrent clients).

    python benchmarks/serve_throughput.py [--clients 16] [--max-tokens 32] [--dtype float32] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the history of Rome", "volcanoes", "the moon landing", "honey bees", "the printing press",
          "coral reefs", "the Silk Road", "black holes", "the French Revolution", "rain forests",
          "the internet", "glaciers", "ancient Egypt", "electric cars", "the human heart", "jazz music"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunelab.cli", "serve", "--port", str(port), "--dtype", args.dtype,
           "--max-batch", str(max(args.clients, 1)), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TUNELAB_API_KEY": ""})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not come up within 180 s")


async def one_request(client: httpx.AsyncClient, url: str, model: str, topic: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a 500-word essay about {topic}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
    return {"seconds": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": tokens}


async def phase(url: str, model: str, n: int, max_tokens: int, concurrent: bool) -> dict:
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*[one_request(client, url, model, TOPICS[i % len(TOPICS)], max_tokens)
                                             for i in range(n)])
        else:
            results = [await one_request(client, url, model, TOPICS[i % len(TOPICS)], max_tokens) for i in range(n)]
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "ttft_ms": statistics.median(r["ttft"] for r in results) * 1000,
            "ttft_p90_ms": sorted(r["ttft"] for r in results)[int(0.9 * (n - 1))] * 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32",
                    help="the server's --dtype: float32 (default; the faster decoder on CPUs whose bf16 is "
                         "avx512_bf16 only), auto or bfloat16")
    ap.add_argument("--threads", type=int, default=1,
                    help="the server's torch CPU threads (default 1: steady on a small shared machine; "
                         "0 = torch's default)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server on kill/timeout

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t_start = time.perf_counter()
    proc = start_server(port, args)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(phase(url, model, 2, 4, concurrent=True))  # warm-up: first-call kernel setup
        seq = asyncio.run(phase(url, model, args.clients, args.max_tokens, concurrent=False))
        conc = asyncio.run(phase(url, model, args.clients, args.max_tokens, concurrent=True))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    speedup = conc["tok_s"] / seq["tok_s"]
    print(f"tunelab serve, bundled model, dtype {args.dtype}, {os.cpu_count()} CPUs, "
          f"threads {args.threads or 'default'}, "
          f"{args.clients} requests x {args.max_tokens} tokens (greedy, streamed)")
    print(f"{'':>14} {'wall s':>8} {'tokens':>7} {'tok/s':>8} {'TTFT ms (median)':>17} {'p90':>7}")
    for name, r in (("one at a time", seq), (f"{args.clients} at once", conc)):
        print(f"{name:>14} {r['wall_s']:8.1f} {r['tokens']:7d} {r['tok_s']:8.1f} {r['ttft_ms']:17.0f} "
              f"{r['ttft_p90_ms']:7.0f}")
    print(f"speedup (aggregate tok/s, {args.clients} concurrent vs one at a time): {speedup:.2f}x "
          f"(target >= 4x); total run {time.perf_counter() - t_start:.0f} s")
    print(json.dumps({"speedup": round(speedup, 2), "ttft_ms": round(conc["ttft_ms"], 1),
                      "ttft_ms_single": round(seq["ttft_ms"], 1), "tok_s_concurrent": round(conc["tok_s"], 1),
                      "tok_s_single": round(seq["tok_s"], 1), "clients": args.clients,
                      "max_tokens": args.max_tokens, "dtype": args.dtype,
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
