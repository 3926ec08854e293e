"""How much faster is `tunelab generate`'s concurrent teacher client than a sequential loop?

200 chat requests against the fault-free fake OpenAI-compatible server (tests/helpers/fakeserver.py, started in its
own process) answering after 200 ms; the same resolver (client, retries, budget, journal with fsync) runs them
one at a time and then 32 at a time. Target: a speed-up >= 25x at concurrency 32 (the ideal is 200 / 7 waves
= 28.6x). The overhead per request is the sequential time per request minus the server's 200 ms.

The concurrent phase takes ~1.5 s, so other processes on a shared machine easily add 20%: it runs
``--repeats`` times (fresh journals, new prompts) and the best time counts, as timeit does (noise only ever
adds time). Every run and the load average are printed.

    python benchmarks/generate_concurrency.py [--requests 200] [--latency 0.2] [--concurrency 32] [--repeats 3]

The last line is JSON: {"speedup": ..., "overhead_ms": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tunelab.generate.client import TeacherClient  # noqa: E402
from tunelab.generate.config import BudgetConfig, TeacherConfig  # noqa: E402
from tunelab.generate.resolver import Resolver, Request  # noqa: E402
from tunelab.generate.journal import Journal, request_key  # noqa: E402


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    server = ROOT / "tests" / "helpers" / "fakeserver.py"
    proc = subprocess.Popen([sys.executable, str(server), "--latency", str(latency)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, json.loads(line)["url"]


def make_requests(n: int, tag: str) -> list[Request]:
    reqs = []
    params = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16, "seed": 0}
    for i in range(n):
        msgs = [{"role": "user", "content": f"[{tag}] Say ok to request {i}."}]
        key = request_key(pipeline="bench", prompt_hash="bench", messages=msgs, model="fake-ok", params=params)
        reqs.append(Request(key=key, messages=msgs, params=params, item=str(i)))
    return reqs


async def run_once(url: str, n: int, concurrency: int, workdir: Path, tag: str) -> tuple[float, int]:
    cfg = TeacherConfig(model="fake-ok", base_url=url, concurrency=concurrency, timeout_s=30, max_retries=2)
    journal = Journal(workdir / f"journal-{tag}.jsonl")
    resolver = Resolver(journal=journal, model=cfg.model, endpoint=url, mode="online",
                    client_factory=lambda: TeacherClient(cfg, api_key="sk-bench"), budget=BudgetConfig(),
                    price=None, concurrency=concurrency, cache=None)
    reqs = make_requests(n, tag)
    # One warm-up request outside the timing (connection set-up, imports).
    await resolver.resolve(make_requests(1, tag + "-warm"))
    t0 = time.perf_counter()
    answers = await resolver.resolve(reqs)
    wall = time.perf_counter() - t0
    await resolver.aclose()
    journal.close()
    return wall, len(answers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="concurrent runs; the best counts")
    a = ap.parse_args()
    load = os.getloadavg()[0]
    proc, url = start_server(a.latency)
    try:
        with tempfile.TemporaryDirectory() as d:
            seq, n_seq = asyncio.run(run_once(url, a.requests, 1, Path(d), "seq"))
            runs = [asyncio.run(run_once(url, a.requests, a.concurrency, Path(d), f"conc{k}"))
                    for k in range(a.repeats)]
    finally:
        proc.stdin.close()
        proc.wait(10)
    assert n_seq == a.requests and all(n == a.requests for _, n in runs), (n_seq, runs)
    con = min(t for t, _ in runs)
    waves = math.ceil(a.requests / a.concurrency)
    ideal = waves * a.latency
    speedup = seq / con
    overhead_ms = (seq / a.requests - a.latency) * 1000
    print(f"requests {a.requests}, server latency {a.latency * 1000:.0f} ms, concurrency {a.concurrency}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the start")
    print(f"sequential:  {seq:7.2f} s  ({seq / a.requests * 1000:.1f} ms per request)")
    print(f"concurrent:  {con:7.2f} s  best of {', '.join(f'{t:.2f}' for t, _ in runs)} "
          f"(ideal {ideal:.2f} s = {waves} waves; {(con - ideal) * 1000:.0f} ms above it)")
    print(f"speed-up:    {speedup:7.1f}x  (ideal {seq / ideal:.1f}x; target >= 25x)")
    print(f"overhead:    {overhead_ms:7.2f} ms per request (client + server + journal, sequential)")
    print(json.dumps({"speedup": round(speedup, 2), "overhead_ms": round(overhead_ms, 2)}))


if __name__ == "__main__":
    main()
