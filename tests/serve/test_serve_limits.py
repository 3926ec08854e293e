"""How much `tunelab serve` takes: sequences (prompts times n) are counted against --max-concurrent, one request
may ask for at most --max-sequences-per-request of them (more is a 400 that says the limit, never a 429 to
retry forever), and a large list leaves room for other clients.

The tiny server of tests/serve/conftest.py (``tiny_server``: 8 sequences in flight, 4 per request) serves the
module. To hold requests in flight without timing, the engine's loop is paused at a gate."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from helpers.serve import TINY_KEY


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120, headers={"Authorization": f"Bearer {TINY_KEY}"})


def completion(server, prompts, **kw) -> httpx.Response:
    base = server.app.state.serving.base_id
    return post(server, "/v1/completions", {"model": base, "prompt": prompts, "max_tokens": 2, "temperature": 0,
                                            **kw})


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=30).json()


def wait_until(cond, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text
    return r.json()["error"]


def test_a_request_larger_than_the_server_ever_takes_is_a_400_that_says_the_limit(tiny_server):
    err = assert_error(completion(tiny_server, [f"Item {i}:" for i in range(129)]), 400, "invalid_value")
    assert err["param"] == "prompt" and "129" in err["message"] and "(4)" in err["message"]
    r = completion(tiny_server, ["a", "b", "c"], n=2)  # 6 sequences
    assert_error(r, 400, "invalid_value")
    assert "retry-after" not in r.headers
    base = tiny_server.app.state.serving.base_id
    err = assert_error(post(tiny_server, "/v1/chat/completions", {"model": base, "n": 5, "max_tokens": 2,
                                                                  "messages": [{"role": "user", "content": "Hi"}]}),
                       400, "invalid_value")
    assert err["param"] == "n"
    r = completion(tiny_server, ["a", "b", "c", "d"])  # at the limit
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 4


@pytest.fixture()
def paused_engine(tiny_server, monkeypatch):
    """The engine's loop held at a gate (requests stay in flight) until the test sets the returned event."""
    engine = tiny_server.app.state.engine
    gate = threading.Event()
    real = engine._iteration

    def gated():
        gate.wait()
        return real()

    monkeypatch.setattr(engine, "_iteration", gated)
    engine.wake()
    yield gate
    gate.set()


def test_a_large_list_leaves_room_for_other_clients_and_429_is_for_a_full_server(tiny_server, paused_engine):
    base = tiny_server.app.state.serving.base_id
    chat = {"model": base, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]}
    with ThreadPoolExecutor(4) as pool:
        big = pool.submit(completion, tiny_server, [f"Item {i}:" for i in range(4)])  # the most one request takes
        wait_until(lambda: health(tiny_server)["active_sequences"] == 4)
        other = pool.submit(post, tiny_server, "/v1/chat/completions", chat)  # another client still gets in
        wait_until(lambda: health(tiny_server)["active_sequences"] == 5)
        rest = pool.submit(completion, tiny_server, ["x"], n=3)  # n counts: 3 sequences
        wait_until(lambda: health(tiny_server)["active_sequences"] == 8)
        full = post(tiny_server, "/v1/chat/completions", chat)  # now the server is full: retry later
        err = assert_error(full, 429, "rate_limit_exceeded")
        assert full.headers["retry-after"] == "1" and "8" in err["message"]
        paused_engine.set()
        assert [f.result().status_code for f in (big, other, rest)] == [200, 200, 200]
    assert len(big.result().json()["choices"]) == 4
    wait_until(lambda: health(tiny_server)["active_sequences"] == 0)


def test_errors_name_the_field_the_client_sent(tiny_server):
    base = tiny_server.app.state.serving.base_id
    chat = {"model": base, "messages": [{"role": "user", "content": "Hi"}]}
    err = assert_error(post(tiny_server, "/v1/chat/completions", {**chat, "max_completion_tokens": 1000}), 400,
                       "invalid_value")
    assert err["param"] == "max_completion_tokens" and "max_completion_tokens" in err["message"]
    err = assert_error(post(tiny_server, "/v1/chat/completions", {**chat, "max_tokens": 1000}), 400, "invalid_value")
    assert err["param"] == "max_tokens"
    # tool_choice without tools is refused, as OpenAI does
    for choice in ("auto", "none", {"type": "function", "function": {"name": "f"}}):
        err = assert_error(post(tiny_server, "/v1/chat/completions", {**chat, "tool_choice": choice}), 400,
                           "invalid_value")
        assert err["param"] == "tool_choice" and "tools" in err["message"]
