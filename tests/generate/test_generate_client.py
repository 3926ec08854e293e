"""The teacher client against a real fault-injecting server on 127.0.0.1 (no mocks of the HTTP layer)."""

import asyncio

import pytest

from helpers.fakeserver import FakeServer, Fault
from helpers.processes import free_port
from tunelab.generate.client import RequestFailed, TeacherClient, TeacherFatal, parse_retry_after
from tunelab.generate.config import BudgetConfig, TeacherConfig
from tunelab.generate.resolver import Resolver, Request
from tunelab.generate.journal import Journal, request_key

KEY = "sk-test-SENTINEL-0123456789"
FAST = dict(backoff_initial_s=0.01, backoff_max_s=0.05, jitter=0.5)


def teacher(url: str, **kw) -> TeacherConfig:
    return TeacherConfig(**{"model": "fake-echo", "base_url": url, "timeout_s": 5, "max_retries": 4, **FAST, **kw})


def msgs(i: int) -> list[dict]:
    return [{"role": "user", "content": f"request number {i}"}]


def complete_all(cfg: TeacherConfig, n: int, key: str | None = KEY) -> tuple[list, TeacherClient]:
    async def go():
        c = TeacherClient(cfg, api_key=key)
        try:
            return await asyncio.gather(*(c.complete(msgs(i), {"max_tokens": 8}) for i in range(n)),
                                        return_exceptions=True), c
        finally:
            await c.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("fault", [
    Fault("429", rate=0.5, attempts=2, retry_after=0.05),
    Fault("429", rate=0.5, retry_after=0.05, retry_after_ms=True),
    Fault("429", rate=0.5),  # no Retry-After: exponential backoff
    Fault("500", rate=0.5, attempts=2),
    Fault("503", rate=0.5),
    Fault("malformed", rate=0.5),
    Fault("disconnect", rate=0.5),
])
def test_retries_recover_every_request(fault):
    with FakeServer(faults=[fault]) as srv:
        results, client = complete_all(teacher(srv.url, concurrency=4), 12)
        st = srv.stats()
    assert all(not isinstance(r, Exception) for r in results), results
    assert [r.text for r in results] == [f"echo: request number {i}" for i in range(12)]
    assert st["faults"].get(fault.kind, 0) > 0
    assert sum(client.stats.retries.values()) == st["faults"][fault.kind]
    assert st["early_retries"] == 0  # nobody came back before the server's Retry-After
    assert st["auth_headers"] == [f"Bearer {KEY}"]


def test_hang_is_cut_by_the_per_request_timeout():
    with FakeServer(faults=[Fault("hang", rate=0.5, hang_s=30)]) as srv:
        results, client = complete_all(teacher(srv.url, timeout_s=0.3, concurrency=8), 6)
    assert all(not isinstance(r, Exception) for r in results), results
    assert client.stats.retries.get("timeout", 0) >= 1


def test_concurrency_is_bounded():
    """Up to ``concurrency`` requests in flight at once (with 20 waiting, the bound is reached), never more."""
    with FakeServer(latency=0.05) as srv:
        results, _ = complete_all(teacher(srv.url, concurrency=3), 20)
        assert srv.stats()["max_inflight"] == 3
    assert [r.text for r in results] == [f"echo: request number {i}" for i in range(20)]


def test_retries_exhausted_fail_only_that_request():
    with FakeServer(faults=[Fault("500", rate=1.0, attempts=99)]) as srv:
        results, _ = complete_all(teacher(srv.url, max_retries=2), 2)
        assert srv.stats()["requests"] == 6
    assert all(isinstance(r, RequestFailed) and r.reason == "retries_exhausted_500" for r in results)


def test_rejected_key_is_fatal_and_never_echoed():
    with FakeServer(api_key="the-right-key") as srv:
        results, _ = complete_all(teacher(srv.url), 1)
    err = results[0]
    assert isinstance(err, TeacherFatal)
    assert "401" in str(err) and KEY not in str(err) and "***" in str(err)


def test_unreachable_endpoint_is_fatal():
    results, _ = complete_all(teacher(f"http://127.0.0.1:{free_port()}/v1"), 1)
    assert isinstance(results[0], TeacherFatal) and "cannot reach" in str(results[0])


def test_retry_after_parsing():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert parse_retry_after({}) is None


def test_engine_budget_stops_cleanly(tmp_path):
    """max_requests: exactly that many requests are sent; the rest stay pending, nothing is lost."""
    with FakeServer() as srv:
        cfg = teacher(srv.url, concurrency=4)

        async def go():
            j = Journal(tmp_path / "j.jsonl")
            eng = Resolver(journal=j, model=cfg.model, endpoint=srv.url, mode="online",
                         client_factory=lambda: TeacherClient(cfg, api_key=KEY),
                         budget=BudgetConfig(max_requests=7), price=None, concurrency=4)
            reqs = [Request(key=request_key(pipeline="t", prompt_hash="p", messages=msgs(i), model=cfg.model,
                                            params={}), messages=msgs(i), params={"max_tokens": 8}, item=str(i))
                    for i in range(20)]
            out = await eng.resolve(reqs)
            await eng.aclose()
            j.close()
            return out, eng

        out, eng = asyncio.run(go())
        assert srv.stats()["completions"] == 7
    assert len(out) == 7 and eng.stopped.startswith("budget.max_requests")
    assert len(Journal(tmp_path / "j.jsonl").entries) == 7
