"""Any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, `tunelab serve`) via the official SDK.

The API key comes from the environment (OPENAI_API_KEY or a named variable) or a key file; it is held
only by the client object and never printed, logged or written (``repr`` of this class hides it).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Callable

from tunelab.errors import ModelError
from tunelab.models.base import ChoiceScores, Generation, GenerationParams, Message

# USD per 1M tokens (input, output), for --dry-run cost estimates. Override in config with `price:`.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}


def resolve_api_key(api_key_env: str | None = None, api_key_file: str | None = None) -> str | None:
    if api_key_file:
        p = Path(api_key_file).expanduser()
        if not p.is_file():
            raise ModelError(f"API key file not found: {p}")
        return p.read_text().strip()
    return os.environ.get(api_key_env or "OPENAI_API_KEY")


class OpenAIModel:
    """Chat completions against an OpenAI-compatible server, with bounded concurrency."""

    supports_scoring = False
    context_length: int | None = None  # an endpoint does not say; eval checks no context length for it

    def __init__(self, model: str, *, base_url: str | None = None, api_key_env: str | None = None,
                 api_key_file: str | None = None, concurrency: int = 8, timeout: float = 60.0,
                 max_retries: int = 3, price: tuple[float, float] | None = None):
        from openai import AsyncOpenAI

        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        key = resolve_api_key(api_key_env, api_key_file)
        if not key and not self.base_url:
            raise ModelError(f"openai:{model} needs an API key: set OPENAI_API_KEY (or api_key_env) "
                             "or point base_url/OPENAI_BASE_URL at a local server")
        self._client_args = dict(api_key=key or "not-needed", base_url=self.base_url, timeout=timeout,
                                 max_retries=max_retries)
        self._client_cls = AsyncOpenAI
        self.concurrency = concurrency
        self.name = model
        self.identity = f"openai:{self.base_url or 'api.openai.com'}:{model}"
        self.price = price or PRICES.get(model)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIModel(model={self.model!r}, base_url={self.base_url!r})"

    def server_warning(self) -> str | None:
        """One line when ``base_url`` is a `tunelab serve` whose ``/health`` says that its output depends on the
        batch (half precision): an eval through it may not reproduce. None for any other endpoint."""
        if not self.base_url:
            return None
        import httpx

        root = self.base_url.rstrip("/").removesuffix("/v1")
        try:
            health = httpx.get(root + "/health", timeout=5).json()
        except Exception:  # noqa: BLE001 - not a tunelab server, or not up: nothing to say
            return None
        if isinstance(health, dict) and health.get("deterministic") is False:
            dtype = health.get("dtype") or "half precision"
            return (f"warning: {self.base_url} is a tunelab server computing in {dtype}: its greedy output and "
                    "log-likelihoods depend on what else it batches, so these results may not reproduce (serve "
                    "with --dtype float32)")
        return None

    def count_tokens(self, messages: list[Message]) -> int:
        """An estimate (no tokenizer download): ~4 characters a token, 1 for CJK characters, +4 per message."""
        n = 0
        for m in messages:
            text = m.get("content") or ""
            cjk = sum(1 for ch in text if ord(ch) > 0x2E80)
            n += 4 + cjk + (len(text) - cjk + 3) // 4
        return n + 3

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        if not self.price:
            return None
        return (prompt_tokens * self.price[0] + completion_tokens * self.price[1]) / 1e6

    def generate(self, prompts: list[list[Message]], params: GenerationParams, *,
                 progress: Callable[[int], None] | None = None) -> list[Generation]:
        return asyncio.run(self._generate_all(prompts, params, progress))

    async def _generate_all(self, prompts, params, progress) -> list[Generation]:
        import openai

        sem = asyncio.Semaphore(self.concurrency)
        client = self._client_cls(**self._client_args)

        async def one(msgs: list[Message]) -> Generation:
            async with sem:
                t0 = time.perf_counter()
                kwargs = dict(model=self.model, messages=msgs, max_tokens=params.max_new_tokens,
                              temperature=params.temperature, top_p=params.top_p)
                if params.stop:
                    kwargs["stop"] = list(params.stop)
                if params.seed is not None:
                    kwargs["seed"] = params.seed
                try:
                    r = await client.chat.completions.create(**kwargs)
                except openai.APIConnectionError:
                    raise ModelError(f"cannot reach the endpoint {self.base_url or 'api.openai.com'} "
                                     f"for model {self.model}") from None
                except openai.AuthenticationError:
                    raise ModelError(f"the endpoint rejected the API key for model {self.model} (401)") from None
                except openai.NotFoundError:
                    raise ModelError(f"model {self.model!r} not found at {self.base_url or 'api.openai.com'}") from None
                choice = r.choices[0]
                usage = r.usage
                g = Generation(text=choice.message.content or "",
                               prompt_tokens=usage.prompt_tokens if usage else self.count_tokens(msgs),
                               completion_tokens=usage.completion_tokens if usage else 0,
                               finish_reason=choice.finish_reason or "stop",
                               latency_ms=(time.perf_counter() - t0) * 1000)
                if progress:
                    progress(1)
                return g

        try:
            return list(await asyncio.gather(*(one(m) for m in prompts)))
        finally:
            await client.close()

    def score_choices(self, prompts, choices, *, progress=None) -> list[ChoiceScores]:
        raise ModelError(f"openai:{self.model} cannot score choices; label tasks use generation + parsing "
                         "with API models")
