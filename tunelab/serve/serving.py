"""Serving logic between the routes and the engine: resolve the model, render and tokenize, check limits,
submit to the engine, and turn its deltas into OpenAI responses or server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse

from tunelab import __version__
from tunelab.serve.adapters import AdapterEntry, AdapterError, AdapterRegistry, registrable_dir
from tunelab.serve.config import ServeConfig
from tunelab.serve.engine import ChoiceDelta, Engine, EngineError, RequestHandle, SamplingParams, TokenInfo
from tunelab.serve.errors import APIError, error_body, from_engine
from tunelab.serve.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                    ChatCompletionChunk, ChatCompletionRequest, ChoiceLogprobs, Completion,
                                    CompletionChoice, CompletionLogprobs, CompletionRequest, DeltaMessage,
                                    Health, ModelCard, ModelList, TokenLogprob, TopLogprob, Usage)

log = logging.getLogger("tunelab.serve")
FINGERPRINT = f"tunelab-{__version__}"


class EventStream(StreamingResponse):
    """Server-sent events that stop, and free the request's batch rows, as soon as the client goes away.

    Starlette's own StreamingResponse (ASGI 2.4) notices a disconnect only at the next write; this one
    listens for ``http.disconnect`` while streaming and cancels the stream at once.
    """

    def __init__(self, content: AsyncIterator[str], on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self._on_close()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class OpenAIServing:
    """The OpenAI endpoints over one engine (one base model and its adapters)."""

    def __init__(self, config: ServeConfig, lm, engine: Engine, registry: AdapterRegistry, *,
                 adapter_roots: list[Path] = ()):
        self.config = config
        self.adapter_roots = list(adapter_roots)
        self.startup_adapters = {e.path for e in registry.entries()}  # re-registrable wherever they are
        self.lm = lm
        self.engine = engine
        self.registry = registry
        self.base_id = config.served_model_name or lm.name
        self.created = int(time.time())
        self.context_length = engine.context_length
        self.max_prompt_tokens = min(config.max_prompt_tokens or self.context_length, self.context_length - 1)

    # -- models ----------------------------------------------------------------------------------------
    def resolve(self, model: str) -> AdapterEntry | None:
        """``None`` for the base model, the adapter entry for an adapter name; 404 for anything else."""
        if model == self.base_id:
            return None
        entry = self.registry.get(model)
        if entry is None:
            raise APIError(404, f"The model `{model}` does not exist. GET /v1/models lists the models served "
                                f"here (the base `{self.base_id}` and its adapters).",
                           param="model", code="model_not_found")
        return entry

    def model_card(self, entry: AdapterEntry | None) -> ModelCard:
        if entry is None:
            return ModelCard(id=self.base_id, created=self.created, root=self.base_id)
        return ModelCard(id=entry.name, created=entry.created, root=self.base_id, parent=self.base_id)

    def models(self) -> ModelList:
        return ModelList(data=[self.model_card(None)] + [self.model_card(e) for e in self.registry.entries()])

    def health(self) -> Health:
        stats = self.engine.stats()
        half = getattr(self.lm, "autocast_dtype", None)
        return Health(dtype=str(half).removeprefix("torch.") if half is not None else "float32",
                      deterministic=half is None,status="ok" if self.engine.alive else "unavailable", model=self.base_id,
                      adapters=len(self.registry), loaded_adapters=stats["loaded_adapters"],
                      running=stats["running"], waiting=stats["waiting"], active_requests=stats["active_requests"],
                      active_sequences=stats["active_sequences"])

    def register_adapter(self, name: str, path: str) -> ModelCard:
        if name == self.base_id:
            raise APIError(409, f"`{name}` is the base model's name; pick another adapter name", param="name",
                           code="model_exists")
        if self.registry.get(name) is not None:
            raise APIError(409, f"an adapter named `{name}` is already registered; DELETE it first",
                           param="name", code="model_exists")
        try:
            entry = self.registry.register(name, registrable_dir(path, self.adapter_roots,
                                                                 self.startup_adapters))
        except AdapterError as e:
            raise APIError(400, str(e), param="path", code="invalid_adapter") from None
        log.info("registered adapter %s from %s", name, entry.path)
        return self.model_card(entry)

    def unregister_adapter(self, name: str) -> dict:
        if not self.registry.unregister(name):
            self.resolve(name)  # 404 in OpenAI's shape (or 400 for the base)
            raise APIError(400, "the base model cannot be removed", param="name")
        self.engine.wake()  # the engine unloads it once no running sequence uses it
        log.info("unregistered adapter %s", name)
        return {"id": name, "object": "model", "deleted": True}

    # -- shared checks ---------------------------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        return self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_prompt(self, ids: list[int], param: str) -> None:
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than this server accepts "
                                f"({self.max_prompt_tokens}); shorten it", param=param,
                           code="context_length_exceeded")

    def _max_tokens(self, requested: int | None, default: int, prompt_len: int, param: str = "max_tokens") -> int:
        room = self.context_length - prompt_len
        if requested is None:
            return max(1, min(default, self.config.max_tokens_limit, room))
        if requested > self.config.max_tokens_limit:
            raise APIError(400, f"{param} is {requested}, more than this server allows "
                                f"({self.config.max_tokens_limit})", param=param, code="invalid_value")
        if requested > room:
            raise APIError(400, f"This model's maximum context length is {self.context_length} tokens. However, "
                                f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                                f"{requested} for the completion). Reduce the prompt or {param}.",
                           param=param, code="context_length_exceeded")
        return requested

    def _check_n(self, n: int) -> None:
        if n > self.config.max_n:
            raise APIError(400, f"n is {n}, more than this server allows ({self.config.max_n})", param="n",
                           code="invalid_value")

    def _check_room(self, prompts: int, n: int) -> None:
        """400 for a request larger than the server ever takes (prompts times n over the per-request cap),
        429 for one that does not fit among the sequences in flight now."""
        need, cap = prompts * n, self.config.max_sequences_per_request
        if need > cap:
            what = f"{prompts} prompts × n={n}" if prompts > 1 else f"n={n}"
            raise APIError(400, f"this request asks for {need} sequences ({what}), more than one request may "
                                f"ask for on this server ({cap}); send the prompts in smaller requests",
                           param="prompt" if prompts > 1 else "n", code="invalid_value")
        try:
            self.engine.check_room(need)
        except EngineError as e:
            raise from_engine(e) from None

    def _submit(self, ids: list[int], entry: AdapterEntry | None, params: SamplingParams, n: int) -> RequestHandle:
        try:
            return self.engine.submit(ids, entry, params, n)
        except EngineError as e:
            raise from_engine(e) from None

    # -- chat ------------------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, raw: Request):
        entry = self.resolve(req.model)
        self._check_n(req.n)
        messages = [m.as_template_message() for m in req.messages]
        try:
            text = self.lm.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True,
                **({"chat_template": entry.chat_template} if entry and entry.chat_template else {}))
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages (e.g. role order)
            raise APIError(400, f"the chat template rejected these messages: {str(e).splitlines()[0]}",
                           param="messages") from None
        self._check_room(1, req.n)
        ids = self._encode_text(text)
        self._check_prompt(ids, "messages")
        max_tokens = self._max_tokens(req.requested_max_tokens, self.config.default_max_tokens, len(ids),
                                      req.max_tokens_param)
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                stop=tuple(req.stop_list), seed=req.seed,
                                logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        handle = self._submit(ids, entry, params, req.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(self._chat_events(handle, req, rid, created, len(ids), include_usage), handle.close)
        try:
            deltas = await self._collect([handle], raw)
        finally:
            handle.close()
        choices, completion_tokens = [], 0
        for i in range(req.n):
            ds = deltas.get(i, [])
            completion_tokens += ds[-1].completion_tokens if ds else 0
            lps = [t for d in ds for t in d.logprobs]
            choices.append(ChatChoice(index=i, message=AssistantMessage(content="".join(d.text for d in ds)),
                                      logprobs=_chat_logprobs(lps) if req.logprobs else None,
                                      finish_reason=ds[-1].finish_reason if ds else "stop"))
        return ChatCompletion(id=rid, created=created, model=req.model, choices=choices,
                              system_fingerprint=FINGERPRINT, usage=_usage(len(ids), completion_tokens))

    async def _chat_events(self, handle: RequestHandle, req: ChatCompletionRequest, rid: str, created: int,
                           prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            body = ChatCompletionChunk(id=rid, created=created, model=req.model, choices=choices,
                                       system_fingerprint=FINGERPRINT, usage=usage).model_dump(mode="json")
            for c in body["choices"]:  # OpenAI omits the unset delta fields
                c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
            if usage is None:
                body.pop("usage")
            return sse(body)

        completion_tokens = [0] * req.n
        try:
            for i in range(req.n):
                yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            async for d in handle:
                completion_tokens[d.index] = d.completion_tokens
                if not d.text and d.finish_reason is None and not d.logprobs:
                    continue
                lp = _chat_logprobs(d.logprobs) if req.logprobs else None
                yield chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(content=d.text or None),
                                             logprobs=lp, finish_reason=d.finish_reason)])
            if include_usage:
                yield chunk([], _usage(prompt_tokens, sum(completion_tokens)))
        except EngineError as e:
            yield sse(error_body(e.status, e.message, code=e.code))
        yield sse("[DONE]")

    # -- completions -----------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request):
        entry = self.resolve(req.model)
        self._check_n(req.n)
        prompts = _prompt_list(req.prompt)
        self._check_room(len(prompts), req.n)
        encoded: list[tuple[str, list[int]]] = []
        for p in prompts:
            if isinstance(p, str):
                ids = self._encode_text(p)
            else:
                vocab = len(self.lm.tokenizer)
                if any(t < 0 or t >= vocab for t in p):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt",
                                   code="invalid_value")
                ids = list(p)
            if not ids:  # an empty prompt starts from the beginning-of-text token
                bos = self.lm.tokenizer.bos_token_id
                ids = [bos if bos is not None else self.lm.tokenizer.eos_token_id]
            self._check_prompt(ids, "prompt")
            encoded.append((p if isinstance(p, str) else self.lm.tokenizer.decode(ids), ids))
        max_tokens = [self._max_tokens(req.max_tokens, 16, len(ids)) if req.max_tokens != 0 else 0
                      for _, ids in encoded]
        handles: list[RequestHandle] = []
        try:
            for (_, ids), mt in zip(encoded, max_tokens):
                params = SamplingParams(max_tokens=mt, temperature=req.temperature, top_p=req.top_p,
                                        stop=tuple(req.stop_list), seed=req.seed, logprobs=req.logprobs,
                                        prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None
                                        else None, eos_logprob=True)
                handles.append(self._submit(ids, entry, params, req.n))
        except APIError:
            for h in handles:
                h.close()
            raise
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        prompt_tokens = sum(len(ids) for _, ids in encoded)

        def close_all() -> None:
            for h in handles:
                h.close()

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(self._completion_events(handles, encoded, req, rid, created, prompt_tokens,
                                                       include_usage), close_all)
        try:
            deltas = await self._collect(handles, raw, n=req.n)
        finally:
            close_all()
        choices, completion_tokens = [], 0
        for p_idx, (prompt_text, _) in enumerate(encoded):
            for i in range(req.n):
                idx = p_idx * req.n + i
                ds = deltas.get(idx, [])
                completion_tokens += ds[-1].completion_tokens if ds else 0
                text = "".join(d.text for d in ds)
                lp = None
                if req.logprobs is not None:
                    infos = (ds[0].prompt_logprobs or [] if ds and req.echo else []) + \
                        [t for d in ds for t in d.logprobs]
                    lp = _completion_logprobs(infos, req.logprobs)
                choices.append(CompletionChoice(index=idx, text=(prompt_text if req.echo else "") + text,
                                                logprobs=lp, finish_reason=ds[-1].finish_reason if ds else "length"))
        return Completion(id=rid, created=created, model=req.model, choices=choices,
                          system_fingerprint=FINGERPRINT, usage=_usage(prompt_tokens, completion_tokens))

    async def _completion_events(self, handles: list[RequestHandle], encoded, req: CompletionRequest, rid: str,
                                 created: int, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            body = Completion(id=rid, created=created, model=req.model, choices=choices,
                              system_fingerprint=FINGERPRINT, usage=usage).model_dump(mode="json")
            if usage is None:
                body.pop("usage")
            return sse(body)

        completion_tokens: dict[int, int] = {}
        started: set[int] = set()
        try:
            async for idx, d in _merged(handles, req.n):
                completion_tokens[idx] = d.completion_tokens
                text = d.text
                infos = list(d.logprobs)
                if idx not in started:
                    started.add(idx)
                    if req.echo:
                        text = encoded[idx // req.n][0] + text
                        infos = (d.prompt_logprobs or []) + infos
                if not text and d.finish_reason is None and not infos:
                    continue
                lp = _completion_logprobs(infos, req.logprobs) if req.logprobs is not None else None
                yield chunk([CompletionChoice(index=idx, text=text, logprobs=lp, finish_reason=d.finish_reason)])
            if include_usage:
                yield chunk([], _usage(prompt_tokens, sum(completion_tokens.values())))
        except EngineError as e:
            yield sse(error_body(e.status, e.message, code=e.code))
        yield sse("[DONE]")

    # -- collecting ------------------------------------------------------------------------------------
    async def _collect(self, handles: list[RequestHandle], raw: Request, n: int = 1) -> dict[int, list[ChoiceDelta]]:
        """All deltas of a non-streaming request by choice index; ends early if the client disconnects."""

        async def gather() -> dict[int, list[ChoiceDelta]]:
            out: dict[int, list[ChoiceDelta]] = {}
            async for idx, d in _merged(handles, n):
                out.setdefault(idx, []).append(d)
            return out

        async def watch() -> None:
            while not await raw.is_disconnected():
                await asyncio.sleep(0.5)

        work, watcher = asyncio.ensure_future(gather()), asyncio.ensure_future(watch())
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if work not in done:
            work.cancel()
            log.info("client disconnected; request cancelled")
            raise APIError(499, "client closed the request", code="client_closed_request")
        try:
            return work.result()
        except EngineError as e:
            raise from_engine(e) from None


async def _merged(handles: list[RequestHandle], n: int) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """Deltas of several handles (one per prompt) as they come, indexed ``prompt * n + choice``."""
    if len(handles) == 1:
        async for d in handles[0]:
            yield d.index, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, h: RequestHandle) -> None:
        try:
            async for d in h:
                queue.put_nowait((p * n + d.index, d))
        except EngineError as e:
            queue.put_nowait((p, e))
        finally:
            queue.put_nowait((p, None))

    tasks = [asyncio.ensure_future(pump(p, h)) for p, h in enumerate(handles)]
    try:
        open_ = len(handles)
        while open_:
            idx, item = await queue.get()
            if item is None:
                open_ -= 1
            elif isinstance(item, EngineError):
                raise item
            else:
                yield idx, item
    finally:
        for t in tasks:
            t.cancel()


def _prompt_list(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(x, int) for x in prompt):
        return [prompt]
    return list(prompt)


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def _chat_logprobs(infos: list[TokenInfo]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes,
                     top_logprobs=[TopLogprob(token=s, bytes=b, logprob=v) for s, b, v in t.top])
        for t in infos])


def _completion_logprobs(infos: list[TokenInfo], k: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = 0
    for t in infos:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append({s: v for s, _, v in t.top} if t.logprob is not None and k else None)
        out.text_offset.append(offset)
        offset += len(t.token)
    return out
