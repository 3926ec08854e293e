"""The teacher client: any OpenAI-compatible endpoint through the official SDK (AsyncOpenAI).

- bounded concurrency (a semaphore; backoff sleeps happen outside it, so a waiting retry frees its slot);
- retries with exponential backoff and jitter on 429, 5xx, timeouts, dropped connections and broken answers,
  honouring ``Retry-After`` / ``retry-after-ms`` (a 429 pauses every request until then, not just one);
- a per-request timeout that covers the whole answer;
- errors that end the run (bad key, unknown model, unreachable endpoint) raise ``TeacherFatal``; errors of
  one request (400, retries used up) raise ``RequestFailed`` and the run goes on;
- the API key lives only inside the SDK client; every message this module produces passes ``redact``.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import ModelError
from tunelab.generate.config import TeacherConfig


class TeacherFatal(ModelError):
    """The endpoint cannot be used at all (unreachable, key rejected, model unknown): stop the run."""


class RequestFailed(Exception):
    """One request failed for good; ``reason`` is a short code for the stats (e.g. ``http_400``)."""

    def __init__(self, reason: str, message: str, attempts: int):
        super().__init__(message)
        self.reason = reason
        self.attempts = attempts


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_ms: float
    attempts: int
    model: str
    logprobs: list[dict[str, Any]] | None = None  # see token_logprobs


@dataclass
class ClientStats:
    sent: int = 0  # HTTP requests, retries included
    ok: int = 0
    retries: dict[str, int] = field(default_factory=dict)  # reason -> count

    def retried(self, reason: str) -> None:
        self.retries[reason] = self.retries.get(reason, 0) + 1


def resolve_key(cfg: TeacherConfig, base_dir: Path) -> str | None:
    """The API key from ``api_key_file`` or the environment variable ``api_key_env``; never logged."""
    if cfg.api_key_file:
        p = Path(cfg.api_key_file).expanduser()
        p = p if p.is_absolute() else base_dir / p
        if not p.is_file():
            raise ModelError(f"teacher.api_key_file: no such file: {p}")
        return p.read_text(encoding="utf-8").strip() or None
    return os.environ.get(cfg.api_key_env) or None


def estimate_tokens(messages: list[dict]) -> int:
    """Prompt tokens without a tokenizer: ~4 characters a token, 1 per CJK character, +4 per message."""
    n = 0
    for m in messages:
        text = str(m.get("content") or "")
        cjk = sum(1 for ch in text if ord(ch) > 0x2E80)
        n += 4 + cjk + (len(text) - cjk + 3) // 4
    return n + 3


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


class TeacherClient:
    def __init__(self, cfg: TeacherConfig, *, api_key: str | None, base_url: str | None = None,
                 rng_seed: int | None = None):
        from openai import AsyncOpenAI

        self.cfg = cfg
        self.model = cfg.model
        self.base_url = base_url or cfg.base_url or os.environ.get("OPENAI_BASE_URL") or None
        if not api_key and not self.base_url:
            raise ModelError(f"teacher {cfg.model} needs an API key: set ${cfg.api_key_env} (or teacher.api_key_env / "
                             "teacher.api_key_file), or point teacher.base_url at a local server")
        self._secret = api_key or ""
        # The SDK does no retries of its own: this class retries, so that it can count, honour Retry-After
        # across all requests, and stop on fatal errors.
        self._client = AsyncOpenAI(api_key=api_key or "not-needed", base_url=self.base_url, max_retries=0,
                                   timeout=cfg.timeout_s + 5)
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._pause_until = 0.0
        self._ever_ok = False
        self._rng = random.Random(rng_seed)
        self.stats = ClientStats()

    @property
    def endpoint(self) -> str:
        return redact_url(self.base_url or "https://api.openai.com/v1")

    def __repr__(self) -> str:  # never show the key
        return f"TeacherClient(model={self.model!r}, endpoint={self.endpoint!r})"

    def redact(self, text: str) -> str:
        if self._secret and len(self._secret) >= 4:
            text = text.replace(self._secret, "***")
        return text

    async def aclose(self) -> None:
        await self._client.close()

    def _backoff(self, attempt: int) -> float:
        d = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * (2 ** attempt))
        return d * (1 - self.cfg.jitter * self._rng.random())

    async def _wait_pause(self) -> None:
        while True:
            wait = self._pause_until - time.monotonic()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def complete(self, messages: list[dict], params: dict[str, Any]) -> Completion:
        """One chat completion, retried as configured. Raises RequestFailed or TeacherFatal."""
        import openai

        # The SDK's low-level post (documented for routes it has no method for) sends the body as it is:
        # chat.completions.create would walk every message through its type transforms first (~0.5 ms CPU a
        # request, which at concurrency 32 shows up as wall time). Errors and status handling are the same.
        body = {"model": self.model, "messages": messages, **params, **self.cfg.extra_body}
        last = "unknown"
        for attempt in range(self.cfg.max_retries + 1):
            await self._wait_pause()
            delay: float | None = None
            async with self._sem:
                t0 = time.perf_counter()
                self.stats.sent += 1
                try:
                    r = await asyncio.wait_for(self._client.post("/chat/completions", body=body, cast_to=object),
                                               self.cfg.timeout_s)
                    text, finish, usage, rmodel, lps = _content(r)
                except (asyncio.TimeoutError, openai.APITimeoutError):
                    last = "timeout"
                except openai.RateLimitError as e:
                    last = "429"
                    delay = parse_retry_after(getattr(e.response, "headers", None))
                    if delay is not None:
                        delay = min(delay, self.cfg.max_retry_after_s)
                        self._pause_until = max(self._pause_until, time.monotonic() + delay)
                except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                    raise TeacherFatal(f"the endpoint {self.endpoint} rejected the API key "
                                       f"({e.status_code}): {self.redact(_err_text(e))}") from None
                except openai.NotFoundError as e:
                    raise TeacherFatal(f"model {self.model!r} or the chat completions route not found at "
                                       f"{self.endpoint} (404): {self.redact(_err_text(e))}") from None
                except openai.APIConnectionError as e:
                    refused = type(e.__cause__).__name__ in ("ConnectError", "ConnectTimeout")
                    if refused and not self._ever_ok and attempt >= 1:
                        raise TeacherFatal(f"cannot reach the endpoint {self.endpoint} (connection refused or "
                                           "unknown host); is the server running?") from None
                    last = "connection"
                    if refused and not self._ever_ok:
                        delay = min(0.5, self.cfg.backoff_initial_s)
                except openai.APIStatusError as e:
                    code = e.status_code
                    if code >= 500 or code in (408, 409, 425):
                        last = str(code)
                    else:
                        raise RequestFailed(f"http_{code}", self.redact(f"HTTP {code}: {_err_text(e)}"),
                                            attempt + 1) from None
                except (openai.APIResponseValidationError, ValueError, KeyError, TypeError, AttributeError,
                        IndexError):
                    last = "malformed"
                except openai.APIError:  # anything else the SDK reports about a response: try again
                    last = "api_error"
                else:
                    self._ever_ok = True
                    self.stats.ok += 1
                    return Completion(
                        text=text, finish_reason=finish, attempts=attempt + 1, model=rmodel, logprobs=lps,
                        prompt_tokens=int(usage.get("prompt_tokens") or 0) if usage else estimate_tokens(messages),
                        completion_tokens=int(usage.get("completion_tokens") or 0) if usage else len(text) // 4,
                        latency_ms=(time.perf_counter() - t0) * 1000)
            if attempt == self.cfg.max_retries:
                break
            self.stats.retried(last)
            await asyncio.sleep(self._backoff(attempt) if delay is None else delay * (1 + 0.1 * self._rng.random()))
        raise RequestFailed(f"retries_exhausted_{last}",
                            f"gave up after {self.cfg.max_retries + 1} attempts (last: {last})", self.cfg.max_retries + 1)


def token_logprobs(choice: dict) -> list[dict[str, Any]] | None:
    """The answer tokens' log probabilities from a chat completion choice (``choices[0].logprobs.content``), as
    ``[{"token": str, "logprob": float, "top": [[token, logprob], ...]}]`` (``top`` only where the server sent
    ``top_logprobs``); None when the server sent none (or not in that shape)."""
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    if not isinstance(content, list) or not content:
        return None
    out: list[dict[str, Any]] = []
    for t in content:
        if not isinstance(t, dict) or not isinstance(t.get("logprob"), (int, float)):
            return None
        e: dict[str, Any] = {"token": str(t.get("token") or ""), "logprob": float(t["logprob"])}
        top = t.get("top_logprobs")
        if isinstance(top, list) and top:
            e["top"] = [[str(x.get("token") or ""), float(x["logprob"])] for x in top
                        if isinstance(x, dict) and isinstance(x.get("logprob"), (int, float))]
        out.append(e)
    return out


def _content(r: Any) -> tuple[str, str, dict, str, list[dict[str, Any]] | None]:
    """(text, finish_reason, usage, model, token logprobs or None) of a chat completion (parsed JSON); anything
    else raises ValueError / KeyError / TypeError, which count as a malformed answer."""
    if isinstance(r, (str, bytes)):
        r = json.loads(r)  # a server that said text/plain
    if not isinstance(r, dict):
        raise ValueError("not a chat completion object")
    choice = r["choices"][0]
    text = choice["message"]["content"]
    if not isinstance(text, str):
        raise ValueError("answer without text content")
    usage = r.get("usage")
    return text, str(choice.get("finish_reason") or "stop"), usage if isinstance(usage, dict) else {}, \
        str(r.get("model") or ""), token_logprobs(choice)


def _err_text(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body["error"] if isinstance(body.get("error"), dict) else body
        if inner.get("message"):
            return str(inner["message"])[:300]
    return str(getattr(e, "message", "") or e)[:300]


def redact_url(url: str) -> str:
    """The URL without user:password@ (some people put credentials there)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<endpoint>"
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=host)
    return urlunsplit(parts)
