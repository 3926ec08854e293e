"""Resolving requests to teacher answers: journal first, then the response cache, then the teacher.

Pipelines hand the resolver a list of ``Request``s and get back the answers that exist; a request is missing
from the result when the budget ran out, the run is in Batch API mode (the request goes into the batch
file instead), or it failed for good (counted, journaled as an error, asked again on the next run).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Literal

from tunelab.evaluate.cache import CallCache, stable_hash
from tunelab.generate.client import RequestFailed, TeacherClient, TeacherFatal, estimate_tokens
from tunelab.generate.config import BudgetConfig, Price
from tunelab.generate.journal import Journal

BATCH_DISCOUNT = 0.5  # the OpenAI Batch API costs half the online price


@dataclass
class Request:
    key: str
    messages: list[dict]
    params: dict[str, Any]
    item: str  # the input's id, for the journal and error reports
    kind: str = "main"  # "main" | "repair"
    sample: int = 0


@dataclass
class Answer:
    key: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    source: str  # where the answer came from first: "api" | "cache" | "batch"
    time: str
    model: str
    endpoint: str = ""
    resumed: bool = False  # read from the journal of an earlier run
    logprobs: list[dict[str, Any]] | None = None  # the answer tokens' logprobs (client.token_logprobs), if sent

    @classmethod
    def from_entry(cls, e: dict[str, Any], *, resumed: bool) -> "Answer":
        u = e.get("usage") or {}
        return cls(key=e["key"], text=e.get("text") or "", finish_reason=e.get("finish_reason") or "stop",
                   prompt_tokens=int(u.get("prompt_tokens") or 0), completion_tokens=int(u.get("completion_tokens") or 0),
                   latency_ms=float(e.get("latency_ms") or 0.0), source=e.get("source") or "api",
                   time=e.get("time") or "", model=e.get("model") or "", endpoint=e.get("endpoint") or "",
                   resumed=resumed, logprobs=e.get("logprobs"))


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def answer_entry(req: Request, *, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                 latency_ms: float, source: str, model: str, attempts: int = 1, endpoint: str = "",
                 logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    e = {"key": req.key, "status": "ok", "item": req.item, "kind": req.kind, "sample": req.sample,
         "text": text, "finish_reason": finish_reason,
         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
         "latency_ms": round(latency_ms, 2), "attempts": attempts, "source": source, "model": model,
         "endpoint": endpoint, "time": now_iso()}
    if logprobs is not None:
        e["logprobs"] = logprobs
    return e


@dataclass
class Spend:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ResolverCounts:
    resumed: int = 0  # answers read from this run folder's journal
    cached: int = 0  # answers from the response cache
    fetched: int = 0  # answers from the teacher in this run
    failed: Counter = field(default_factory=Counter)  # reason -> requests that failed for good
    latencies: list[float] = field(default_factory=list)


class Resolver:
    def __init__(self, *, journal: Journal, model: str, endpoint: str, mode: Literal["online", "batch", "dry"],
                 client_factory: Callable[[], TeacherClient] | None, budget: BudgetConfig, price: Price | None,
                 concurrency: int, cache: CallCache | None = None,
                 progress: Callable[[int, int], None] | None = None):
        self.journal = journal
        self.model = model
        self.endpoint = endpoint
        self.mode = mode
        self.client_factory = client_factory
        self.client: TeacherClient | None = None
        self.budget = budget
        self.price = price
        self.concurrency = concurrency
        self.cache = cache
        self.progress = progress
        self.stopped: str | None = None
        self.pending: list[Request] = []  # batch / dry mode: requests that would be sent
        self.counts = ResolverCounts()
        self.used: dict[str, Answer] = {}  # every answer handed to the pipeline, by key
        self.failed_keys: set[str] = set()  # requests that failed for good in this run
        self._cache_buf: list[tuple[str, Any]] = []
        # The budget covers everything this run folder has spent, so a rerun cannot overspend it.
        self.spent = Spend()
        for e in journal.entries.values():
            if e.get("status") == "error":
                self.spent.requests += 1
            elif e.get("source") in ("api", "batch"):
                self._add_spend(self.spent, e.get("usage") or {}, batch=e.get("source") == "batch")
        self._reserved = Spend()

    # ---------------------------------------------------------------------------------------------- money
    def cost(self, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float:
        if not self.price:
            return 0.0
        c = (prompt_tokens * self.price.input + completion_tokens * self.price.output) / 1e6
        return c * (BATCH_DISCOUNT if batch else 1.0)

    def _add_spend(self, s: Spend, usage: dict, *, batch: bool = False) -> None:
        p, c = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        s.requests += 1
        s.prompt_tokens += p
        s.completion_tokens += c
        s.cost_usd += self.cost(p, c, batch=batch)

    def _reserve(self, req: Request) -> bool:
        """Reserve the most a request can spend; False (and stop) when the budget cannot cover it."""
        b, s, r = self.budget, self.spent, self._reserved
        p_est, c_max = estimate_tokens(req.messages), int(req.params.get("max_tokens") or 0)
        if b.max_requests is not None and s.requests + r.requests + 1 > b.max_requests:
            self.stopped = f"budget.max_requests ({b.max_requests}) reached"
        elif b.max_tokens is not None and s.tokens + r.tokens + p_est + c_max > b.max_tokens:
            self.stopped = f"budget.max_tokens ({b.max_tokens:,}) reached"
        elif b.max_cost_usd is not None and s.cost_usd + r.cost_usd + self.cost(p_est, c_max) > b.max_cost_usd:
            self.stopped = f"budget.max_cost_usd (${b.max_cost_usd:g}) reached"
        if self.stopped:
            return False
        r.requests += 1
        r.prompt_tokens += p_est
        r.completion_tokens += c_max
        r.cost_usd += self.cost(p_est, c_max)
        return True

    def _release(self, req: Request) -> None:
        r = self._reserved
        p_est, c_max = estimate_tokens(req.messages), int(req.params.get("max_tokens") or 0)
        r.requests -= 1
        r.prompt_tokens -= p_est
        r.completion_tokens -= c_max
        r.cost_usd -= self.cost(p_est, c_max)

    # ---------------------------------------------------------------------------------------------- resolve
    def cache_key(self, key: str) -> str:
        return stable_hash({"request": key, "endpoint": self.endpoint}, 64)

    async def resolve(self, reqs: list[Request]) -> dict[str, Answer]:
        """Answers for as many of ``reqs`` as possible (see the module docstring)."""
        out: dict[str, Answer] = {}
        todo: list[Request] = []
        seen: set[str] = set()
        for r in reqs:
            if r.key in seen:
                continue
            seen.add(r.key)
            e = self.journal.done(r.key)
            if e is not None:
                out[r.key] = Answer.from_entry(e, resumed=True)
                self.counts.resumed += 1
            else:
                todo.append(r)
        if todo and self.cache is not None:
            hits = self.cache.get_many([self.cache_key(r.key) for r in todo])
            rest = []
            for r in todo:
                h = hits.get(self.cache_key(r.key))
                if h is None:
                    rest.append(r)
                    continue
                entry = answer_entry(r, text=h["text"], finish_reason=h.get("finish_reason", "stop"),
                                     prompt_tokens=h.get("prompt_tokens", 0),
                                     completion_tokens=h.get("completion_tokens", 0), latency_ms=0.0,
                                     source="cache", model=h.get("model", ""), endpoint=self.endpoint,
                                     logprobs=h.get("logprobs"))
                self.journal.append(entry)
                out[r.key] = Answer.from_entry(entry, resumed=False)
                self.counts.cached += 1
            todo = rest
        if todo and not self.stopped:
            if self.mode == "online":
                out.update(await self._fetch(todo))
            else:
                for r in todo:
                    # A batch file holds only what the budget allows (a dry run shows everything).
                    if self.mode == "batch" and not self._reserve(r):
                        break
                    self.pending.append(r)
                self.stopped = self.stopped or ("batch" if self.mode == "batch" else "dry run")
        self.used.update(out)
        return out

    async def _fetch(self, todo: list[Request]) -> dict[str, Answer]:
        if self.client is None:
            assert self.client_factory is not None
            self.client = self.client_factory()
        client = self.client
        out: dict[str, Answer] = {}
        it = iter(todo)
        total, done = len(todo), 0

        async def worker() -> None:
            nonlocal done
            while not self.stopped:
                req = next(it, None)
                if req is None or not self._reserve(req):
                    return
                try:
                    c = await client.complete(req.messages, req.params)
                except RequestFailed as e:
                    self._release(req)
                    self.spent.requests += 1
                    self.counts.failed[e.reason] += 1
                    self.failed_keys.add(req.key)
                    self.journal.append({"key": req.key, "status": "error", "item": req.item, "kind": req.kind,
                                         "reason": e.reason, "error": client.redact(str(e)),
                                         "attempts": e.attempts, "time": now_iso()})
                    continue
                except BaseException:
                    self._release(req)
                    raise
                self._release(req)
                entry = answer_entry(req, text=c.text, finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens,
                                     completion_tokens=c.completion_tokens, latency_ms=c.latency_ms, source="api",
                                     model=c.model, attempts=c.attempts, endpoint=self.endpoint,
                                     logprobs=c.logprobs)
                self.journal.append(entry)
                self._add_spend(self.spent, entry["usage"])
                out[req.key] = Answer.from_entry(entry, resumed=False)
                self.counts.fetched += 1
                self.counts.latencies.append(c.latency_ms)
                if self.cache is not None:
                    self._cache_buf.append((self.cache_key(req.key), {
                        "text": c.text, "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                        "completion_tokens": c.completion_tokens, "model": c.model,
                        **({"logprobs": c.logprobs} if c.logprobs is not None else {})}))
                    if len(self._cache_buf) >= 256:
                        self.flush_cache()
                done += 1
                if self.progress:
                    self.progress(done, total)

        # Twice as many workers as request slots: a worker sleeping out a backoff does not hold a slot.
        tasks = [asyncio.create_task(worker()) for _ in range(min(len(todo), self.concurrency * 2))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            self.stopped = self.stopped or "error"
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self.journal.sync()
            self.flush_cache()
        return out

    def flush_cache(self) -> None:
        if self.cache is not None and self._cache_buf:
            self.cache.put_many(self._cache_buf)
            self._cache_buf = []

    async def aclose(self) -> None:
        self.flush_cache()
        self.journal.sync()
        if self.client is not None:
            await self.client.aclose()  # kept (closed) for its stats


__all__ = ["Answer", "Resolver", "Request", "TeacherFatal", "answer_entry", "now_iso"]
