"""Continuous batching over a Hugging Face causal LM: one decode loop, requests join and leave between steps.

The engine thread owns the model. Each iteration it

1. drops sequences whose client went away, and unloads adapters that were unregistered;
2. admits waiting requests up to ``max_batch`` sequences (``n`` choices are ``n`` sequences), loading their
   adapters into LRU slots, and prefills them in one left-padded forward pass (a prefix that all of them
   share, such as the chat template's system prompt, runs once per adapter and its KV cache is copied);
3. merges their KV cache into the running batch (left-padding the shorter cache on the time axis) and runs
   one decode step for every sequence: ``input (B, 1)`` + ``cache (B, H, T, D)`` -> ``logits (B, V)``;
4. samples a token per sequence, detokenizes, checks stop strings, and sends the new text to the request's
   asyncio queue (the HTTP handler streams it); finished sequences leave the batch and free their rows.

Rows of different adapters share a forward pass: PEFT's ``adapter_names`` routes each row through its own
LoRA weights (``__base__`` for none). Position ids follow each row's real tokens, padding is masked, so a
sequence decodes exactly as it would alone (greedy output equals ``LocalModel.generate``; a test checks it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tunelab.models.scoring import common_prefix_len
from tunelab.serve.adapters import AdapterEntry, AdapterError, AdapterRegistry, AdapterSlots

if TYPE_CHECKING:
    from tunelab.models.local import LocalModel

log = logging.getLogger("tunelab.serve")


# --------------------------------------------------------------------------------------------------
# what goes in and what comes out
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k most likely
    prompt_logprobs: int | None = None  # completions with echo: the same for every prompt token
    eos_logprob: bool = False  # list the end-of-text token in the logprobs too (legacy completions do)


@dataclass
class TokenInfo:
    token: str
    bytes: list[int]
    logprob: float | None  # None for a prompt's first token (nothing predicts it)
    top: list[tuple[str, list[int], float]] = field(default_factory=list)


@dataclass
class ChoiceDelta:
    """New output of one choice: the text since the last delta, and whether the choice has finished."""

    index: int
    text: str
    logprobs: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" once finished
    completion_tokens: int = 0
    prompt_logprobs: list[TokenInfo] | None = None  # on the first delta, when asked for


class EngineError(Exception):
    """A request the engine cannot serve; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 500, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


class RequestHandle:
    """One request (``n`` choices) as the HTTP handler sees it: an async stream of ``ChoiceDelta``."""

    def __init__(self, engine: "Engine", prompt_ids: list[int], adapter: AdapterEntry | None,
                 params: SamplingParams, n: int, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.adapter = adapter
        self.params = params
        self.n = n
        self.cancelled = False  # set on the event loop, read by the engine thread
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = n
        self._closed = False

    # engine thread
    def push(self, item: ChoiceDelta | EngineError) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            self.cancelled = True

    # event loop
    @property
    def finished(self) -> bool:
        return self._open <= 0

    async def get(self) -> ChoiceDelta:
        item = await self._queue.get()
        if isinstance(item, EngineError):
            self._open = 0
            raise item
        if item.finish_reason is not None:
            self._open -= 1
        return item

    async def __aiter__(self):
        while not self.finished:
            yield await self.get()

    def close(self) -> None:
        """Release the request's slot; an unfinished request is cancelled and leaves the batch."""
        if self._closed:
            return
        self._closed = True
        if not self.finished:
            self.cancelled = True
            self.engine.wake()
        self.engine._active -= self.n
        self.engine._active_prompts -= 1


# --------------------------------------------------------------------------------------------------
# detokenization helpers
# --------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class TokenText:
    """Each token's own text and bytes (for logprobs), cached."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self.tok.convert_ids_to_tokens(token_id)
            try:
                raw = bytes(self._byte_of[c] for c in piece)
            except (KeyError, TypeError):
                raw = self.tok.decode([token_id]).encode("utf-8")
            hit = (raw.decode("utf-8", errors="replace"), list(raw))
            self._cache[token_id] = hit
        return hit


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _make_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv)


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that may be the start of a stop string (not sent yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


# --------------------------------------------------------------------------------------------------
# one sequence in the batch
# --------------------------------------------------------------------------------------------------
class Sequence:
    def __init__(self, handle: RequestHandle, index: int, adapter: str, eos_ids: set[int]):
        self.handle = handle
        self.index = index
        self.adapter = adapter  # the PEFT adapter name (BASE for the base model)
        self.params = handle.params
        self.eos_ids = eos_ids
        self.out_ids: list[int] = []
        self.n_generated = 0
        self.pending: int | None = None  # the last sampled token, not yet in the KV cache
        self.sent = 0  # characters of the text already sent
        self.finish_reason: str | None = None
        self._lp: list[TokenInfo] = []
        self._prompt_lp: list[TokenInfo] | None = None
        self.generator: torch.Generator | None = None
        if self.params.temperature > 0:
            seed = self.params.seed + index if self.params.seed is not None else \
                int.from_bytes(os.urandom(8), "little") >> 1
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(self, token: int, info: TokenInfo | None, tokenizer) -> None:
        """Append a sampled token; send the text that became final; finish on EOS, stop string or length."""
        self.n_generated += 1
        p = self.params
        text = None
        if token in self.eos_ids:
            self.finish_reason = "stop"
            if info is not None and p.eos_logprob:
                self._lp.append(info)
        else:
            self.out_ids.append(token)
            self.pending = token
            if info is not None:
                self._lp.append(info)
            text = tokenizer.decode(self.out_ids, skip_special_tokens=True)
            if p.stop:
                window = max(0, self.sent - max(len(s) for s in p.stop))
                hits = [i for i in (text.find(s, window) for s in p.stop) if i >= 0]
                if hits:
                    text = text[:min(hits)]
                    self.finish_reason = "stop"
            if self.finish_reason is None and self.n_generated >= p.max_tokens:
                self.finish_reason = "length"
        if self.finish_reason is not None:
            self._emit(text[self.sent:] if text is not None else "", final=True)
            return
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":  # an incomplete UTF-8 character
            end -= 1
        end -= _holdback(text[:end], p.stop)
        if end > self.sent:
            self._emit(text[self.sent:end])
            self.sent = end

    def finish_now(self, reason: str) -> None:
        self.finish_reason = reason
        self._emit("", final=True)

    def set_prompt_logprobs(self, infos: list[TokenInfo]) -> None:
        self._prompt_lp = infos

    def _emit(self, text: str, final: bool = False) -> None:
        delta = ChoiceDelta(index=self.index, text=text, logprobs=self._lp,
                            finish_reason=self.finish_reason if final else None,
                            completion_tokens=self.n_generated, prompt_logprobs=self._prompt_lp)
        self._lp, self._prompt_lp = [], None
        self.handle.push(delta)


# --------------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------------
class Engine:
    """Owns the model and runs the batching loop in a background thread."""

    def __init__(self, lm: "LocalModel", registry: AdapterRegistry, *, max_batch: int = 32,
                 max_prefill_tokens: int = 4096, max_loaded_adapters: int = 4, max_concurrent: int = 128):
        from transformers import AutoTokenizer

        self.lm = lm
        self.registry = registry
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.max_concurrent = max_concurrent
        self.slots = AdapterSlots(lm.model, registry, max_loaded_adapters)
        # A tokenizer of the engine's own: a Rust tokenizer is not to be shared across threads.
        self.tokenizer = AutoTokenizer.from_pretrained(str(lm.path))
        self.token_text = TokenText(self.tokenizer)
        self.eos_ids = set(lm.eos_ids())
        self.pad_id = lm.tokenizer.pad_token_id
        self.device = lm.device
        self.context_length = int(getattr(lm.model.config, "max_position_embeddings", 0) or 2048)
        self._waiting: deque[RequestHandle] = deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._active = 0  # sequences in flight (prompts times n); changed on the event loop only
        self._active_prompts = 0  # handles in flight (a completions request has one per prompt)
        self.dead: str | None = None
        # the running batch
        self._rows: list[Sequence] = []
        self._admitting: list[Sequence] = []  # admitted this iteration, not yet merged into the batch
        self._cache = None  # a DynamicCache; per layer keys and values (B, H_kv, T, D)
        self._mask: torch.Tensor | None = None  # (B, T) 1 = real token, 0 = left padding
        self.steps = 0
        self.min_shared_prefix = 16  # tokens; a shorter common prefix is not worth a separate pass
        self.shared_prefix_tokens = 0  # prompt tokens not recomputed thanks to prefix sharing

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tunelab-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def alive(self) -> bool:
        return self.dead is None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        return {"running": len(self._rows), "waiting": len(self._waiting), "active_requests": self._active_prompts,
                "active_sequences": self._active,
                "loaded_adapters": len(self.slots), "steps": self.steps,
                "shared_prefix_tokens": self.shared_prefix_tokens}

    # -- event loop side -----------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], adapter: AdapterEntry | None, params: SamplingParams,
               n: int = 1) -> RequestHandle:
        """Queue a request of ``n`` sequences (call on the event loop). Raises EngineError 503 (engine down) or
        429 (no room for ``n`` more sequences now)."""
        if not self.alive:
            raise EngineError("the engine is not running" + (f": {self.dead}" if self.dead else ""), 503,
                              "service_unavailable")
        self.check_room(n)
        handle = RequestHandle(self, prompt_ids, adapter, params, n, asyncio.get_running_loop())
        self._active += n
        self._active_prompts += 1
        with self._lock:
            self._waiting.append(handle)
        self.wake()
        return handle

    def check_room(self, sequences: int) -> None:
        """429 (transient: retry) unless ``sequences`` more fit under ``max_concurrent`` now. A request that can
        never fit is the caller's to refuse with a 400 first."""
        if self._active + sequences > self.max_concurrent:
            raise EngineError(f"the server is busy: {self._active} of its {self.max_concurrent} sequences are in "
                              f"flight and this request needs {sequences}; retry shortly", 429, "rate_limit_exceeded")

    # -- engine thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stopping:
                self._wakeup.clear()  # before looking at the queue: a submit after this wakes the wait below
                try:
                    with torch.inference_mode(), self.lm.autocast():
                        busy = self._iteration()
                except Exception as e:  # noqa: BLE001 - one bad step must not take the server down
                    log.exception("engine step failed; failing the %d running sequences", len(self._rows))
                    self._fail_running(EngineError(f"internal error while generating: {type(e).__name__}"))
                    busy = True
                if not busy:
                    self._wakeup.wait(0.5)
        except BaseException as e:  # pragma: no cover - the thread itself died
            self.dead = f"{type(e).__name__}: {e}"
            raise
        finally:
            err = EngineError("the server is shutting down", 503, "service_unavailable")
            self._fail_running(err)
            with self._lock:
                waiting, self._waiting = list(self._waiting), deque()
            for h in waiting:
                h.push(err)

    def _iteration(self) -> bool:
        self._drop_cancelled()
        self.slots.sweep()
        new = self._admit()
        if new:
            self._prefill(new)
        self._admitting = []
        if self._rows:
            self._decode()
            self.steps += 1
        return bool(new or self._rows)

    def _admit(self) -> list[Sequence]:
        """Take waiting requests, in order, while rows and the prefill budget allow; load their adapters.

        A request whose adapter cannot get a slot (every slot pinned by running sequences) keeps its place
        in the queue and the ones behind it may go first.
        """
        new: list[Sequence] = []
        deferred: list[RequestHandle] = []
        tokens = 0
        while True:
            with self._lock:
                if not self._waiting:
                    break
                h = self._waiting[0]
                if h.cancelled:
                    self._waiting.popleft()
                    continue
                cost = h.n * len(h.prompt_ids)
                if len(self._rows) + len(new) + h.n > self.max_batch or \
                        (new and tokens + cost > self.max_prefill_tokens):
                    break
                self._waiting.popleft()
            try:
                adapter = self.slots.acquire(h.adapter)
            except AdapterError as e:
                h.push(EngineError(str(e), 500, "adapter_load_failed"))
                continue
            except Exception as e:  # noqa: BLE001 - the request that met it gets the error, not a hang
                log.exception("adapter slot for %r failed", h.adapter and h.adapter.name)
                h.push(EngineError(f"internal error while loading the adapter: {type(e).__name__}", 500,
                                   "adapter_load_failed"))
                continue
            if adapter is None:
                deferred.append(h)
                continue
            for _ in range(h.n - 1):
                self.slots.acquire(h.adapter)  # one pin per sequence
            seqs = [Sequence(h, i, adapter, self.eos_ids) for i in range(h.n)]
            new += seqs
            self._admitting += seqs
            tokens += cost
        if deferred:
            with self._lock:
                self._waiting.extendleft(reversed(deferred))
        return new

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                 cache, adapters: list[str], logits_to_keep: int = 1) -> torch.Tensor:
        kwargs = {}
        if hasattr(self.slots.model, "peft_config"):
            kwargs["adapter_names"] = adapters
        out = self.slots.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                               position_ids=position_ids.to(self.device), cache=cache, use_cache=True,
                               logits_to_keep=logits_to_keep, **kwargs)
        return out.logits

    def _prefill(self, new: list[Sequence]) -> None:
        # Sequences that asked for prompt logprobs need logits at every position: prefill them one by one.
        groups = [[s] for s in new if s.params.prompt_logprobs is not None]
        plain = [s for s in new if s.params.prompt_logprobs is None]
        if plain:
            groups.append(plain)
        for group in groups:
            prompts = [s.handle.prompt_ids for s in group]
            shared = common_prefix_len(prompts) if len(group) > 1 else 0
            shared = min(shared, min(len(p) for p in prompts) - 1)  # each row keeps a token of its own
            if shared >= self.min_shared_prefix:
                cache, mask, logits = self._prefill_shared(group, prompts, shared)
            else:
                cache, mask, logits = self._prefill_padded(group, prompts)
            if group[0].params.prompt_logprobs is not None:
                group[0].set_prompt_logprobs(self._prompt_logprobs(logits[0], prompts[0],
                                                                   group[0].params.prompt_logprobs))
            self._merge(group, _kv(cache), mask)
            self._advance(group, logits[:, -1, :])

    def _prefill_padded(self, group: list[Sequence], prompts: list[list[int]]):
        """One forward over the left-padded prompts: ``ids (B, L)`` -> cache ``(B, H, L, D)``."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])  # (B, L)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, L)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _make_cache([])
        want_all = group[0].params.prompt_logprobs is not None
        logits = self._forward(ids, mask, pos, cache, [s.adapter for s in group],
                               logits_to_keep=0 if want_all else 1)  # (B, L or 1, V)
        return cache, mask, logits

    def _prefill_shared(self, group: list[Sequence], prompts: list[list[int]], shared: int):
        """Prompts that start alike (a chat template's system prompt): the first ``shared`` tokens run once
        per adapter, their KV cache is copied to every row, then each row's own suffix runs on top. Rows are
        ``[prefix | padding | suffix]``; the 2D mask hides the padding and positions skip it."""
        adapters = sorted({s.adapter for s in group})
        prefix = torch.tensor([prompts[0][:shared]] * len(adapters))  # (A, P)
        ones = torch.ones_like(prefix)
        cache = _make_cache([])
        self._forward(prefix, ones, torch.arange(shared).expand(len(adapters), -1), cache, adapters,
                      logits_to_keep=1)
        rows = torch.tensor([adapters.index(s.adapter) for s in group])
        kv = [(k.index_select(0, rows.to(k.device)), v.index_select(0, rows.to(v.device))) for k, v in _kv(cache)]
        suffixes = [p[shared:] for p in prompts]
        width = max(len(x) for x in suffixes)
        ids = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in suffixes])  # (B, S)
        smask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in suffixes])  # (B, S)
        pos = shared + (smask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([torch.ones(len(group), shared, dtype=smask.dtype), smask], dim=1)  # (B, P + S)
        cache = _make_cache(kv)
        logits = self._forward(ids, mask, pos, cache, [s.adapter for s in group])  # (B, 1, V)
        self.shared_prefix_tokens += shared * (len(group) - len(adapters))
        return cache, mask, logits

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([[s.pending] for s in rows])  # (B, 1)
        pos = self._mask.sum(-1, keepdim=True)  # (B, 1): each row's real length is the new token's position
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=self._mask.dtype)], dim=1)  # (B, T+1)
        logits = self._forward(ids, mask, pos, self._cache, [s.adapter for s in rows])  # appends to the cache
        self._mask = mask
        self._advance(rows, logits[:, -1, :])

    def _advance(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row from ``logits (B, V)``, hand it to its sequence, drop finished rows."""
        logits = logits.float()
        tokens = logits.argmax(-1).tolist()
        logprobs = None
        if any(s.params.logprobs is not None for s in rows):
            logprobs = torch.log_softmax(logits, dim=-1)
        for i, s in enumerate(rows):
            if s.finished:
                continue
            if s.params.max_tokens == 0:
                s.finish_now("length")
                continue
            if s.generator is not None:
                tokens[i] = self._sample(logits[i], s)
            info = self._token_info(logprobs[i], tokens[i], s.params.logprobs) \
                if logprobs is not None and s.params.logprobs is not None else None
            s.add_token(tokens[i], info, self.tokenizer)
        self._remove([s for s in self._rows if s.finished])

    @staticmethod
    def _sample(logits: torch.Tensor, s: Sequence) -> int:
        """Temperature and nucleus (top_p) sampling with the sequence's own generator (reproducible seeds)."""
        probs = torch.softmax(logits / s.params.temperature, dim=-1)
        if s.params.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = (sorted_p.cumsum(0) - sorted_p) < s.params.top_p  # always keeps the most likely token
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            return int(order[torch.multinomial(sorted_p, 1, generator=s.generator)])
        return int(torch.multinomial(probs, 1, generator=s.generator))

    def _token_info(self, logprobs: torch.Tensor, token: int, k: int) -> TokenInfo:
        text, raw = self.token_text(token)
        top = []
        if k:
            vals, idx = logprobs.topk(k)
            top = [(*self.token_text(t), v) for t, v in zip(idx.tolist(), vals.tolist())]
        return TokenInfo(token=text, bytes=raw, logprob=float(logprobs[token]), top=top)

    def _prompt_logprobs(self, logits: torch.Tensor, prompt: list[int], k: int) -> list[TokenInfo]:
        """``logits (L, V)`` of one unpadded prompt -> the logprob of each prompt token given the ones before."""
        lp = torch.log_softmax(logits[:-1].float(), dim=-1)  # (L-1, V): position j predicts token j+1
        first_text, first_raw = self.token_text(prompt[0])
        out: list[TokenInfo] = [TokenInfo(token=first_text, bytes=first_raw, logprob=None)]
        for j, tok in enumerate(prompt[1:]):
            out.append(self._token_info(lp[j], tok, k))
        return out

    # -- batch bookkeeping ---------------------------------------------------------------------------
    def _merge(self, group: list[Sequence], kv: list[tuple[torch.Tensor, torch.Tensor]],
               mask: torch.Tensor) -> None:
        """Join prefilled sequences to the running batch; the shorter cache is left-padded in time."""
        if not self._rows:
            self._rows, self._cache, self._mask = list(group), _make_cache(kv), mask
            return
        t_old, t_new = self._mask.shape[1], mask.shape[1]
        width = max(t_old, t_new)

        def pad(x: torch.Tensor, t: int, dim: int) -> torch.Tensor:
            if t == width:
                return x
            shape = list(x.shape)
            shape[dim] = width - t
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        self._cache = _make_cache([(torch.cat([pad(k0, t_old, 2), pad(k1, t_new, 2)]),
                                    torch.cat([pad(v0, t_old, 2), pad(v1, t_new, 2)]))
                                   for (k0, v0), (k1, v1) in zip(_kv(self._cache), kv)])
        self._mask = torch.cat([pad(self._mask, t_old, 1), pad(mask, t_new, 1)])
        self._rows = self._rows + list(group)

    def _remove(self, gone: list[Sequence]) -> None:
        if not gone:
            return
        for s in gone:
            self.slots.release(s.adapter)
        gone_ids = {id(s) for s in gone}
        keep = [i for i, s in enumerate(self._rows) if id(s) not in gone_ids]
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache, self._mask = None, None
            return
        idx = torch.tensor(keep)
        mask = self._mask[idx]
        lead = int((mask.sum(0) == 0).long().cumprod(0).sum())  # columns that are padding in every row
        self._mask = mask[:, lead:]
        kv = _kv(self._cache)
        dev_idx = idx.to(kv[0][0].device)
        self._cache = _make_cache([(k.index_select(0, dev_idx)[:, :, lead:], v.index_select(0, dev_idx)[:, :, lead:])
                                   for k, v in kv])

    def _drop_cancelled(self) -> None:
        gone = [s for s in self._rows if s.handle.cancelled]
        if gone:
            log.info("dropping %d sequences whose client went away", len(gone))
            for s in gone:
                s.finish_reason = "cancelled"
            self._remove(gone)

    def _fail_running(self, err: EngineError) -> None:
        merged = {id(s) for s in self._rows}
        rows = self._rows + [s for s in self._admitting if id(s) not in merged and not s.finished]
        self._rows, self._admitting, self._cache, self._mask = [], [], None, None
        for s in rows:
            self.slots.release(s.adapter)
        for h in {id(s.handle): s.handle for s in rows}.values():
            h.push(err)
