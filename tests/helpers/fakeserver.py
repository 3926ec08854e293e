"""A small fault-injecting OpenAI-compatible server on 127.0.0.1 for tests and benchmarks.

Plain asyncio HTTP/1.1 (keep-alive), so it adds almost no overhead of its own and can misbehave in ways a
framework would not let it: answer 429 with Retry-After, 500, hang, close the connection, or send
malformed JSON. Answers are pure functions of the request's messages (see ``answer_for``), so a test can
compute what the teacher said and check labels, numbers and instructions end to end.

In a test::

    with FakeServer(latency=0.05, labels=["Positive", "Negative"],
                    faults=[Fault("429", rate=0.3, retry_after=0.2)]) as srv:
        ... point base_url at srv.url ...
        srv.stats()["completions"]

Standalone (the benchmark starts it this way, in its own process)::

    python tests/helpers/fakeserver.py --latency 0.2      # prints {"url": ...} on one line, serves until stdin closes

Behaviour per request, picked by the model name (``fake-label``, ``fake-math``, ``fake-instruct``,
``fake-echo``, ``fake-ok``) or, for any other name, from the prompt: a label set (``labels=``) that occurs in
the prompt -> label; "JSON" and "instruction" in the prompt -> instruct; digits in the last user message ->
math; else echo. A label is derived from a hash of the user message, or, with ``label_fn``, is
``label_fn(user message)`` (a function the test writes, e.g. the gold label of a known text, flipped for a
chosen few; ``None`` falls back to the hash). A request with ``logprobs: true`` gets
``choices[0].logprobs.content = logprobs_fn(user message, answer text)`` when the test gives that function (OpenAI's
shape: ``[{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]``), else ``logprobs: null`` (a server
without logprobs). ``answer_fn(model, user message)``, when given, answers any
request with the text it returns (``None``: the behaviour above).

Faults are deterministic: a rule hits a fixed share (``rate``) of distinct prompts, chosen by hashing the
prompt, on their first ``attempts`` tries; a retry after that gets a normal answer. ``fault_cycle`` instead
deals faults out round-robin to distinct prompts in order of arrival (``None`` = no fault), so that every
kind is sure to occur once there are as many prompts as entries.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

BAD_ANSWER = "I cannot decide."  # what `wrong_rate` prompts get on their first try (not parseable)

_ADJ = ["short", "formal", "funny", "detailed", "simple", "polite", "critical", "gentle", "clear", "vivid",
        "brief", "careful", "friendly", "precise", "honest", "playful"]
_NOUN = ["poem", "email", "summary", "story", "review", "recipe", "speech", "letter", "joke", "tweet", "plan",
         "riddle", "slogan", "dialogue", "checklist", "headline"]
_TOPIC = ["rainy days", "public libraries", "electric cars", "coffee", "old maps", "river fish", "mountain trails",
          "night markets", "board games", "city parks", "wind power", "ice cream", "paper planes", "tea ceremonies",
          "street music", "garden snails"]
_AUD = ["children", "a manager", "tourists", "students", "a friend", "engineers", "grandparents", "a neighbour"]


def _h(*parts: Any) -> int:
    data = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def _frac(*parts: Any) -> float:
    return _h(*parts) / 2**64


@dataclass
class Fault:
    """``kind``: "429" (with Retry-After when ``retry_after`` is set), "500", "503", "hang" (no answer for
    ``hang_s``), "malformed" (200 with broken JSON), "disconnect" (close without answering), "401"."""

    kind: str
    rate: float = 1.0
    attempts: int = 1
    retry_after: float | None = None
    retry_after_ms: bool = False  # send `retry-after-ms` (OpenAI's header) instead of `retry-after` seconds
    hang_s: float = 30.0


def key_message(messages: list[dict], flawed: set[str] | frozenset = frozenset({BAD_ANSWER})) -> str:
    """The user message an answer is derived from: the last one, or, in a repair re-ask (the conversation
    holds one of the server's own flawed answers), the one that prompted the flawed answer."""
    for i, m in enumerate(messages):
        if m.get("role") == "assistant" and m.get("content") in flawed:
            for j in range(i - 1, -1, -1):
                if messages[j].get("role") == "user":
                    return str(messages[j].get("content") or "")
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content") or "")
    return ""


def label_for(messages: list[dict], labels: list[str]) -> str:
    return labels[_h("label", key_message(messages)) % len(labels)]


def numbers_in(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"(?<![\d.])\d+(?!\d)(?!\.\d)", text)]  # integers, not decimals


def math_answer(messages: list[dict]) -> int:
    """The fake 'solution' of a word problem: the sum of the integers in the question."""
    return sum(numbers_in(key_message(messages)))


def instruct_tasks(messages: list[dict], k: int = 5, dup_rate: float = 0.2, blacklist_rate: float = 0.1) -> list[dict]:
    """k new tasks derived from the prompt; some are repeats of a common task (near-duplicate filters must drop
    them) and some mention an image (the self-instruct blacklist must drop them)."""
    base = _h("instruct", key_message(messages), json.dumps(messages, ensure_ascii=False))
    tasks = []
    for i in range(k):
        r = _h(base, i)
        if _frac(base, i, "dup") < dup_rate:
            instr = "Write a short poem about rainy days for children."
        elif _frac(base, i, "bl") < blacklist_rate:
            instr = f"Draw a picture of {_TOPIC[r % len(_TOPIC)]} and describe the image."
        else:
            instr = (f"Write a {_ADJ[r % 16]} {_NOUN[(r >> 4) % 16]} about {_TOPIC[(r >> 8) % 16]} "
                     f"for {_AUD[(r >> 12) % 8]}, number {r % 100000}.")
        inp = "" if (r >> 20) % 2 else f"Context {r % 977}: the weather is {_ADJ[(r >> 24) % 16]}."
        tasks.append({"instruction": instr, "input": inp, "output": f"Here is the answer to task {r % 100000}."})
    return tasks


@dataclass
class _State:
    requests: int = 0
    completions: int = 0
    inflight: int = 0
    max_inflight: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    early_retries: int = 0
    attempts: dict[str, int] = field(default_factory=dict)
    not_before: dict[str, float] = field(default_factory=dict)
    completed_prompts: dict[str, int] = field(default_factory=dict)
    auth_headers: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    logprobs_asked: int = 0  # requests with logprobs: true
    top_logprobs: set = field(default_factory=set)  # the top_logprobs values asked for


class FakeServer:
    def __init__(self, *, latency: float = 0.0, faults: list[Fault] | tuple = (),
                 fault_cycle: list[Fault | None] | tuple = (), flaw_cycle: list[str | None] | tuple = (),
                 labels: list[str] | None = None, label_fn: Callable[[str], str | None] | None = None,
                 answer_fn: Callable[[str, str], str | None] | None = None,
                 logprobs_fn: Callable[[str, str], list[dict] | None] | None = None,
                 api_key: str | None = None, wrong_rate: float = 0.0, inconsistent_rate: float = 0.0,
                 answer_format: str = "The answer is {n}.", tasks_per_response: int = 5,
                 host: str = "127.0.0.1", port: int = 0):
        self.latency = latency
        self.faults = list(faults)
        self.fault_cycle = list(fault_cycle)
        self._dealt: dict[str, Fault | None] = {}
        self.flaw_cycle = list(flaw_cycle)  # "bad" | "inconsistent" | None, dealt to distinct questions
        self._flaws: dict[str, str | None] = {}
        self.labels = list(labels or [])
        self.label_fn = label_fn
        self.answer_fn = answer_fn
        self.logprobs_fn = logprobs_fn
        self.api_key = api_key
        self.wrong_rate = wrong_rate
        self.inconsistent_rate = inconsistent_rate
        self.answer_format = answer_format
        self.tasks_per_response = tasks_per_response
        self.host = host
        self.port = port
        self.state = _State()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task] = set()
        self._flawed: set[str] = {BAD_ANSWER}  # deliberately bad answers given, to recognise repair re-asks

    # ---------------------------------------------------------------------------------------------- control
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "FakeServer":
        self._thread = threading.Thread(target=self._run_thread, daemon=True, name="fakeserver")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    def _run_thread(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._loop is None:
            return

        async def _close() -> None:
            assert self._server is not None
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> "FakeServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = self.state
            return {"requests": s.requests, "completions": s.completions, "max_inflight": s.max_inflight,
                    "faults": dict(s.faults), "early_retries": s.early_retries,
                    "distinct_prompts": len(s.attempts), "completed_prompts": dict(s.completed_prompts),
                    "auth_headers": sorted(s.auth_headers), "models": sorted(s.models),
                    "logprobs_asked": s.logprobs_asked, "top_logprobs": sorted(s.top_logprobs)}

    # ---------------------------------------------------------------------------------------------- HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task:
            self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, path, _ = lines[0].split(" ", 2)
                except ValueError:
                    return
                headers = {}
                for ln in lines[1:]:
                    if ":" in ln:
                        k, v = ln.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = b""
                n = int(headers.get("content-length") or 0)
                if n:
                    body = await reader.readexactly(n)
                keep = await self._dispatch(method, path, headers, body, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return
        finally:
            if task:
                self._tasks.discard(task)
            try:
                writer.close()
            except Exception:
                pass

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, payload: bytes, *,
                    headers: dict[str, str] | None = None) -> None:
        reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
                  500: "Internal Server Error", 503: "Service Unavailable", 400: "Bad Request"}.get(status, "X")
        h = {"content-type": "application/json", "content-length": str(len(payload)), "connection": "keep-alive",
             **(headers or {})}
        head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        writer.write(head.encode("latin-1") + payload)
        await writer.drain()

    @staticmethod
    def _error(message: str, type_: str, code: str | None = None) -> bytes:
        return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()

    async def _dispatch(self, method: str, path: str, headers: dict, body: bytes,
                        writer: asyncio.StreamWriter) -> bool:
        path = path.split("?", 1)[0]
        if method == "GET" and path.rstrip("/").endswith("/models"):
            await self._send(writer, 200, json.dumps({"object": "list", "data": [
                {"id": "fake-teacher", "object": "model", "created": 0, "owned_by": "fakeserver"}]}).encode())
            return True
        if method == "GET" and path == "/_stats":
            await self._send(writer, 200, json.dumps(self.stats()).encode())
            return True
        if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
            await self._send(writer, 404, self._error(f"no route {method} {path}", "invalid_request_error"))
            return True
        auth = headers.get("authorization", "")
        with self._lock:
            self.state.auth_headers.add(auth)
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            given = auth.removeprefix("Bearer ")
            # Like some real servers, echo the key that was given: the client must not print it.
            await self._send(writer, 401, self._error(f"Incorrect API key provided: {given}", "invalid_request_error",
                                                      "invalid_api_key"))
            return True
        try:
            req = json.loads(body)
            messages = req["messages"]
        except (ValueError, KeyError, TypeError):
            await self._send(writer, 400, self._error("expected a JSON body with messages", "invalid_request_error"))
            return True
        return await self._complete(req, messages, writer)

    async def _complete(self, req: dict, messages: list[dict], writer: asyncio.StreamWriter) -> bool:
        pkey = f"{_h(req.get('model'), messages, req.get('seed'), req.get('temperature')):016x}"
        now = time.monotonic()
        with self._lock:
            st = self.state
            st.requests += 1
            attempt = st.attempts.get(pkey, 0)
            st.attempts[pkey] = attempt + 1
            nb = st.not_before.pop(pkey, None)
            if nb is not None and now < nb - 0.02:
                st.early_retries += 1
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
            st.models.add(str(req.get("model")))
            if req.get("logprobs"):
                st.logprobs_asked += 1
                st.top_logprobs.add(req.get("top_logprobs"))
        try:
            fault = None
            if self.fault_cycle:
                with self._lock:
                    if pkey not in self._dealt:
                        self._dealt[pkey] = self.fault_cycle[len(self._dealt) % len(self.fault_cycle)]
                    f = self._dealt[pkey]
                if f is not None and attempt < f.attempts:
                    fault = f
            for i, f in enumerate(self.faults):
                if fault is None and attempt < f.attempts and _frac("fault", i, pkey) < f.rate:
                    fault = f
            if fault is not None:
                with self._lock:
                    st.faults[fault.kind] = st.faults.get(fault.kind, 0) + 1
                return await self._fault(fault, pkey, writer)
            if self.latency:
                await asyncio.sleep(self.latency)
            text = self.answer(req.get("model") or "", messages, pkey)
            ptoks = sum(len(str(m.get("content") or "")) for m in messages) // 4 + 4
            ctoks = len(text) // 4 + 1
            logprobs = None
            if req.get("logprobs") and self.logprobs_fn is not None:
                content = self.logprobs_fn(key_message(messages, self._flawed), text)
                logprobs = {"content": content} if content is not None else None
            payload = {"id": f"chatcmpl-{pkey}", "object": "chat.completion", "created": int(time.time()),
                       "model": req.get("model"), "system_fingerprint": "fakeserver",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop", "logprobs": logprobs}],
                       "usage": {"prompt_tokens": ptoks, "completion_tokens": ctoks,
                                 "total_tokens": ptoks + ctoks}}
            await self._send(writer, 200, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
            with self._lock:
                st.completions += 1
                st.completed_prompts[pkey] = st.completed_prompts.get(pkey, 0) + 1
            return True
        finally:
            with self._lock:
                st.inflight -= 1

    async def _fault(self, f: Fault, pkey: str, writer: asyncio.StreamWriter) -> bool:
        if f.kind == "429":
            headers = {}
            if f.retry_after is not None:
                with self._lock:
                    self.state.not_before[pkey] = time.monotonic() + f.retry_after
                if f.retry_after_ms:
                    headers["retry-after-ms"] = str(int(f.retry_after * 1000))
                else:
                    headers["retry-after"] = f"{f.retry_after:g}"
            await self._send(writer, 429, self._error("Rate limit reached, slow down", "requests",
                                                      "rate_limit_exceeded"), headers=headers)
            return True
        if f.kind in ("500", "503"):
            await self._send(writer, int(f.kind), self._error("The server had an error", "server_error"))
            return True
        if f.kind == "401":
            await self._send(writer, 401, self._error("invalid key", "invalid_request_error"))
            return True
        if f.kind == "hang":
            await asyncio.sleep(f.hang_s)
            return False
        if f.kind == "malformed":
            await self._send(writer, 200, b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"ind')
            return True
        if f.kind == "disconnect":
            return False
        raise ValueError(f"unknown fault kind {f.kind!r}")

    # ---------------------------------------------------------------------------------------------- answers
    def mode_for(self, model: str, messages: list[dict]) -> str:
        if model.startswith("fake-"):
            return model[5:]
        prompt = "\n".join(str(m.get("content") or "") for m in messages)
        if self.labels and any(lab in prompt for lab in self.labels):
            return "label"
        if "JSON" in prompt and "instruction" in prompt.lower():
            return "instruct"
        if re.search(r"\d", key_message(messages)):
            return "math"
        return "echo"

    def answer(self, model: str, messages: list[dict], pkey: str = "") -> str:
        mode = self.mode_for(model, messages)
        km = key_message(messages, self._flawed)
        repair = any(m.get("role") == "assistant" and m.get("content") in self._flawed for m in messages)
        flaw = None
        if not repair and self.flaw_cycle:
            with self._lock:
                if km not in self._flaws:
                    self._flaws[km] = self.flaw_cycle[len(self._flaws) % len(self.flaw_cycle)]
                flaw = self._flaws[km]
        wrong = self.wrong_rate and _frac("wrong", km) < self.wrong_rate
        if not repair and mode != "ok" and (flaw == "bad" or wrong):
            return BAD_ANSWER
        if self.answer_fn is not None and (text := self.answer_fn(model, km)) is not None:
            return text
        if mode == "label":
            if self.label_fn is not None:
                lab = self.label_fn(km)
                if lab is not None:
                    return lab
            if not self.labels:
                return "Positive"
            return self.labels[_h("label", km) % len(self.labels)]
        if mode == "math":
            nums = numbers_in(km)
            n = sum(nums)
            steps = " + ".join(str(x) for x in nums) or "0"
            flawed = not repair and (flaw == "inconsistent" or (
                self.inconsistent_rate and _frac("inc", km) < self.inconsistent_rate))
            text = f"We add the numbers: {steps} = {n}.\n" + self.answer_format.format(n=n + 1 if flawed else n)
            if flawed:
                with self._lock:
                    self._flawed.add(text)
            return text
        if mode == "instruct":
            return json.dumps(instruct_tasks(messages, self.tasks_per_response), ensure_ascii=False, indent=1)
        if mode == "ok":
            return "ok"
        return f"echo: {km[:200]}"


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--labels", default="", help="comma-separated label set")
    ap.add_argument("--api-key", default=None)
    a = ap.parse_args(argv)
    srv = FakeServer(latency=a.latency, port=a.port, api_key=a.api_key,
                     labels=[x for x in a.labels.split(",") if x]).start()
    print(json.dumps({"url": srv.url}), flush=True)
    try:
        sys.stdin.read()  # serve until the parent closes our stdin (or kills us)
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
