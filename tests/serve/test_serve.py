"""`tunelab serve` with real clients: the official openai SDK and httpx against a server on a free local port.

One server (bundled model, float32 so greedy output can be compared exactly with in-process generation, an
API key, two LoRA adapters made here) serves the whole module; it runs in a thread of the test process.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytestmark = pytest.mark.model

KEY = "test-key-0123456789"
ADMIN_KEY = "test-admin-key-5555"
BASE = "smollm2-135m"
PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Say hello."}],
           [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Color of the sky?"}],
           [{"role": "user", "content": "Name three fruits."}]]
LONG = [{"role": "user", "content": "Write a 500-word essay about the history of Rome."}]  # > 120 tokens greedy


def make_lora(path, seed: int, embeddings: bool = False):
    """A tiny random LoRA over the bundled model (B initialised randomly, so it changes the outputs); with
    ``embeddings`` it also carries its own input embeddings (``modules_to_save``, as the default NSMC recipe)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.models.convert import resolve_local_path

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(resolve_local_path(None)), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     modules_to_save=["embed_tokens"] if embeddings else None)
    model = get_peft_model(base, cfg)
    if embeddings:
        with torch.no_grad():
            emb = model.get_input_embeddings().modules_to_save["default"].weight
            emb.add_(torch.randn_like(emb) * emb.std())
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_lora(root / name, seed, embeddings=name == "lora-b")
            for name, seed in (("lora-a", 1), ("lora-b", 2), ("lora-c", 3))}


@pytest.fixture(scope="module")
def server(adapters):
    from tunelab.serve.app import ServerThread, build_app
    from tunelab.serve.config import ServeConfig

    cfg = ServeConfig(dtype="float32", api_key=KEY, admin_key=ADMIN_KEY,
                      adapter_roots=[str(adapters["lora-c"].parent)],
                      adapters={"lora-a": str(adapters["lora-a"]), "lora-b": str(adapters["lora-b"])},
                      max_loaded_adapters=2, max_batch=32, max_body_bytes=64 * 1024, max_tokens_limit=256)
    app = build_app(cfg)
    with ServerThread(app) as srv:
        srv.app = app
        yield srv


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def async_client(server):
    """An AsyncOpenAI client; use it as ``async with`` inside the event loop that runs the requests."""
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def post(server, path: str, body, *, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, **{"timeout": 120, **kw})


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def in_process(adapter=None):
    from tunelab.models import load_model

    return load_model(None, adapter=str(adapter) if adapter else None, dtype="float32", cache=False)


def wait_until(cond, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------------
# the OpenAI SDK
# --------------------------------------------------------------------------------------------------
def test_models_list_has_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == BASE and {"lora-a", "lora-b"} <= set(ids)
    assert client.models.retrieve("lora-a").id == "lora-a"


def test_greedy_through_server_equals_in_process(server, adapters):
    """Concurrent requests (one batch mixing the base and two adapters) give exactly the in-process greedy text."""
    from tunelab.models import GenerationParams

    models = [BASE, "lora-a", "lora-b"]

    async def ask(aclient, model, messages):
        r = await aclient.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
        return r.choices[0].message.content, r.choices[0].finish_reason

    async def run():
        async with async_client(server) as aclient:
            return await asyncio.gather(*[ask(aclient, m, p) for m in models for p in PROMPTS])

    got = asyncio.run(run())
    want = []
    for m in models:
        lm = in_process(adapters[m] if m != BASE else None)
        want += [(g.text, g.finish_reason) for g in lm.generate(PROMPTS, GenerationParams(max_new_tokens=12))]
    assert got == want
    base, a, b = (got[i * len(PROMPTS):(i + 1) * len(PROMPTS)] for i in range(3))
    assert base != a and a != b  # the model name selects the adapter
    assert "Paris" in base[0][0]


def test_shared_prefix_prefill_equals_padded_prefill(adapters):
    """Prompts that share the chat template's system prompt prefill it once per adapter: same logits."""
    import torch

    from tunelab.models.scoring import common_prefix_len
    from tunelab.serve.adapters import AdapterRegistry
    from tunelab.serve.engine import Engine, RequestHandle, SamplingParams, Sequence

    lm = in_process()
    registry = AdapterRegistry()
    entry = registry.register("a", adapters["lora-a"])
    engine = Engine(lm, registry)
    loop = asyncio.new_event_loop()
    prompts = [lm.encode(p) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[3], LONG)]
    group = []
    for i, ids in enumerate(prompts):
        adapter = entry if i % 2 else None
        h = RequestHandle(engine, ids, adapter, SamplingParams(max_tokens=4, temperature=0), 1, loop)
        group.append(Sequence(h, 0, engine.slots.acquire(adapter), engine.eos_ids))
    shared = common_prefix_len(prompts)
    assert shared >= engine.min_shared_prefix
    with torch.inference_mode():
        _, mask_a, padded = engine._prefill_padded(group, prompts)
        _, mask_b, once = engine._prefill_shared(group, prompts, shared)
    loop.close()
    assert mask_a.sum(-1).tolist() == mask_b.sum(-1).tolist() == [len(p) for p in prompts]
    torch.testing.assert_close(once[:, -1], padded[:, -1], atol=1e-3, rtol=1e-3)
    assert once[:, -1].argmax(-1).tolist() == padded[:, -1].argmax(-1).tolist()


def test_streaming_sends_tokens_as_they_come(client):
    kw = dict(model=BASE, messages=PROMPTS[3], max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 5  # token by token, not one block at the end
    assert "".join(pieces) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_n_seed_top_p_stop_and_logprobs(client):
    kw = dict(model=BASE, messages=PROMPTS[1], max_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    # ... and they are samples: the n choices differ, where temperature 0 gives the one greedy answer n times
    assert len({c.message.content for c in a.choices}) > 1, a.choices
    greedy = client.chat.completions.create(**{**kw, "temperature": 0})
    assert len({c.message.content for c in greedy.choices}) == 1
    assert a.usage.completion_tokens > 0

    full = client.chat.completions.create(model=BASE, messages=PROMPTS[0], max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    assert " of " in text
    cut = client.chat.completions.create(model=BASE, messages=PROMPTS[0], max_tokens=12, temperature=0, stop=[" of "])
    assert cut.choices[0].message.content == text.split(" of ")[0]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=BASE, messages=PROMPTS[0], max_tokens=12, temperature=0,
                                              stop=[" of "], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text.split(" of ")[0]

    lp = client.chat.completions.create(model=BASE, messages=PROMPTS[0], max_tokens=4, temperature=0,
                                        logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the most likely one
        assert bytes(t.bytes).decode() == t.token
    assert "".join(t.token for t in content) == lp.choices[0].message.content


def test_completions(client):
    r = client.completions.create(model=BASE, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 6
    # echo + logprobs scores the prompt (what lm-eval's loglikelihood requests do)
    e = client.completions.create(model=BASE, prompt="The capital of France is", max_tokens=1, temperature=0,
                                  echo=True, logprobs=1)
    lp = e.choices[0].logprobs
    assert e.choices[0].text.startswith("The capital of France is")
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == e.usage.prompt_tokens + 1
    # several prompts (strings or token ids) in one request, n choices each
    ids = in_process_tokenizer()("Hello", add_special_tokens=False)["input_ids"]
    m = client.completions.create(model="lora-a", prompt=["One, two,", "A, B,"], max_tokens=3, temperature=0, n=2)
    assert sorted(c.index for c in m.choices) == [0, 1, 2, 3]
    t = client.completions.create(model=BASE, prompt=ids, max_tokens=3, temperature=0)
    assert t.choices[0].text
    chunks = list(client.completions.create(model=BASE, prompt="1, 2, 3,", max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == \
        client.completions.create(model=BASE, prompt="1, 2, 3,", max_tokens=6, temperature=0).choices[0].text


def in_process_tokenizer():
    from transformers import AutoTokenizer

    from tunelab.models.convert import resolve_local_path

    return AutoTokenizer.from_pretrained(str(resolve_local_path(None)))


def test_sdk_errors(server, client):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=PROMPTS[0])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE, messages=PROMPTS[0], temperature=3)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


# --------------------------------------------------------------------------------------------------
# errors and limits, over raw HTTP
# --------------------------------------------------------------------------------------------------
def test_error_shapes_and_status_codes(server):
    chat = {"model": BASE, "messages": PROMPTS[0], "max_tokens": 2}
    assert_error(post(server, "/v1/chat/completions", chat, key=None), 401, "missing_api_key")
    assert_error(post(server, "/v1/chat/completions", chat, key="wrong"), 401, "invalid_api_key")
    assert_error(post(server, "/v1/chat/completions", {**chat, "model": "nope"}), 404, "model_not_found")
    err = assert_error(post(server, "/v1/chat/completions", {**chat, "temperature": 9}), 400)
    assert err["param"] == "temperature"
    err = assert_error(post(server, "/v1/chat/completions", {"model": BASE}), 400)
    assert err["param"] == "messages"
    assert_error(post(server, "/v1/chat/completions", {**chat, "max_tokens": 100000}), 400, "invalid_value")
    assert_error(post(server, "/v1/chat/completions", {**chat, "tools": [{"type": "function"}]}), 400)
    err = assert_error(post(server, "/v1/chat/completions", {**chat, "frequency_penalty": 0.5}), 400)
    assert err["param"] == "frequency_penalty" and "not supported" in err["message"]
    assert_error(post(server, "/v1/chat/completions", {**chat, "n": 12}), 400, "invalid_value")
    huge = {**chat, "messages": [{"role": "user", "content": "x " * 40000}]}  # 80 KB > the 64 KiB limit
    assert_error(post(server, "/v1/chat/completions", huge), 413, "request_too_large")
    big = {**chat, "messages": [{"role": "user", "content": "word " * 9000}]}  # under 64 KiB, over 8192 tokens
    assert_error(post(server, "/v1/chat/completions", big), 400, "context_length_exceeded")
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert_error(r, 400)
    assert_error(httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    # the body limit also holds for a chunked upload that declares no length
    r = httpx.post(server.url + "/v1/completions", content=iter([b"{" + b" " * 40000] * 3), timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert_error(r, 413, "request_too_large")


def test_health_and_openapi(server):
    h = httpx.get(server.url + "/health").json()  # no key needed
    assert h["status"] == "ok" and h["model"] == BASE
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(schema["paths"])
    assert "ChatCompletionRequest" in schema["components"]["schemas"]


def test_too_many_requests_is_429(server):
    engine = server.app.state.engine
    old = engine.max_concurrent
    engine.max_concurrent = 1
    try:
        body = {"model": BASE, "messages": LONG, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as held:
            lines = held.iter_lines()  # (keep the iterator: closing it closes the connection)
            assert next(lines).startswith("data: ")  # the first request holds the only slot
            r = post(server, "/v1/chat/completions", {**body, "stream": False, "max_tokens": 2})
            assert_error(r, 429, "rate_limit_exceeded")
            assert r.headers.get("retry-after")
    finally:
        engine.max_concurrent = old
    wait_until(lambda: httpx.get(server.url + "/health").json()["active_requests"] == 0)


def test_disconnect_mid_stream_frees_the_slot(server):
    body = {"model": BASE, "messages": LONG, "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()  # (keep the iterator: closing it closes the connection)
        seen = 0
        while seen < 4:
            seen += next(lines).startswith("data: {")
        assert httpx.get(server.url + "/health").json()["running"] >= 1
    # the connection is closed here, long before 250 tokens
    wait_until(lambda: (lambda h: h["running"] == 0 and h["active_requests"] == 0)(
        httpx.get(server.url + "/health").json()))


def test_a_failing_adapter_slot_answers_500_not_a_hang(server, client, monkeypatch):
    """An unexpected error while a request's adapter is loaded (or another evicted) fails that request at once."""
    import openai

    slots = server.app.state.engine.slots

    def broken(entry):
        raise RuntimeError("simulated PEFT failure")

    monkeypatch.setattr(slots, "acquire", broken)
    with pytest.raises(openai.InternalServerError) as e:
        client.with_options(timeout=30).chat.completions.create(model="lora-a", messages=PROMPTS[0], max_tokens=3)
    assert e.value.status_code == 500 and "RuntimeError" in e.value.body["message"]
    assert e.value.body["code"] == "adapter_load_failed"
    monkeypatch.undo()
    r = client.chat.completions.create(model="lora-a", messages=PROMPTS[0], max_tokens=3)
    assert r.choices[0].message.content


def test_a_failing_step_answers_500_and_the_server_goes_on(server, client, monkeypatch):
    import openai

    engine = server.app.state.engine
    real = engine._forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", flaky)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=BASE, messages=PROMPTS[0], max_tokens=3)
    assert e.value.status_code == 500 and "RuntimeError" in e.value.body["message"]
    r = client.chat.completions.create(model=BASE, messages=PROMPTS[0], max_tokens=3)
    assert r.choices[0].message.content
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_tunelab_openai_backend_uses_the_server(server, monkeypatch):
    """`openai:` models in eval/generate can point at a running `tunelab serve` (a fully offline teacher)."""
    from tunelab.models import GenerationParams, load_model

    monkeypatch.setenv("TUNELAB_TEST_SERVE_KEY", KEY)
    remote = load_model(f"openai:{BASE}", base_url=server.url + "/v1", api_key_env="TUNELAB_TEST_SERVE_KEY",
                        cache=False)
    params = GenerationParams(max_new_tokens=8)
    got = [g.text for g in remote.generate(PROMPTS[:2], params)]
    assert got == [g.text for g in in_process().generate(PROMPTS[:2], params)]


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_slot(server):
    body = {"model": BASE, "messages": LONG, "max_tokens": 250, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        post(server, "/v1/chat/completions", body, timeout=httpx.Timeout(30, read=1.5))
    wait_until(lambda: (lambda h: h["running"] == 0 and h["active_requests"] == 0)(
        httpx.get(server.url + "/health").json()))


# --------------------------------------------------------------------------------------------------
# adapters at run time
# --------------------------------------------------------------------------------------------------
def test_admin_registers_adapter_and_lru_evicts(server, client, adapters, tmp_path):
    reg = {"name": "lora-c", "path": str(adapters["lora-c"])}
    assert_error(post(server, "/admin/adapters", reg, key=None), 401)
    assert_error(post(server, "/admin/adapters", reg), 401)  # the API key is no admin key
    r = post(server, "/admin/adapters", reg, key=ADMIN_KEY)
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "lora-c" and r.json()["parent"] == BASE
    assert_error(post(server, "/admin/adapters", reg, key=ADMIN_KEY), 409)
    assert_error(post(server, "/admin/adapters", {"name": "bad", "path": str(tmp_path)}, key=ADMIN_KEY), 400,
                 "invalid_adapter")
    assert "lora-c" in [m.id for m in client.models.list().data]
    # three adapters through two slots: each request loads its adapter and evicts the least recently used
    outs = {}
    for name in ("lora-a", "lora-b", "lora-c", "lora-a"):
        r = client.chat.completions.create(model=name, messages=PROMPTS[0], max_tokens=6, temperature=0)
        outs.setdefault(name, set()).add(r.choices[0].message.content)
    assert len(outs["lora-a"]) == 1  # reloaded after eviction, same output
    assert httpx.get(server.url + "/health").json()["loaded_adapters"] <= 2
    d = httpx.delete(server.url + "/admin/adapters/lora-c", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert d.status_code == 200 and d.json()["deleted"] is True
    assert_error(post(server, "/v1/chat/completions", {"model": "lora-c", "messages": PROMPTS[0]}), 404)


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------
def test_64_concurrent_clients(server):
    """64 clients at once (chat and completions, streaming or not, base and adapters): all well-formed."""
    models = [BASE, "lora-a", "lora-b"]

    async def one(aclient, i: int):
        model = models[i % 3]
        if i % 4 == 0:
            stream = await aclient.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Count to {i % 7 + 2}."}], max_tokens=6,
                temperature=0.7, seed=i, stream=True)
            chunks = [c async for c in stream]
            assert chunks[0].choices[0].delta.role == "assistant"
            assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        if i % 4 == 1:
            r = await aclient.completions.create(model=model, prompt=f"Item {i}:", max_tokens=6, temperature=0)
            assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 6
            return r.choices[0].text
        r = await aclient.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Say the number {i}."}], max_tokens=6,
            temperature=0 if i % 2 else 0.8)
        assert r.object == "chat.completion" and r.model == model and r.id.startswith("chatcmpl-")
        assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
        assert 0 < r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0
        return r.choices[0].message.content

    async def run():
        async with async_client(server) as aclient:
            return await asyncio.gather(*[one(aclient, i) for i in range(64)], return_exceptions=True)

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(isinstance(r, str) for r in results)
    wait_until(lambda: httpx.get(server.url + "/health").json()["active_requests"] == 0)


def test_a_qlora_adapter_is_served_on_the_full_precision_base_and_says_so(adapters, tmp_path, caplog):
    """Many adapters share one base in the server, so a QLoRA adapter's quantised base is not rebuilt there: the
    log says so and names the exact alternative (eval and `tunelab merge` use the dequantised base)."""
    import json
    import logging
    import shutil

    from tunelab.serve.adapters import AdapterRegistry

    q = tmp_path / "qlora"
    shutil.copytree(adapters["lora-a"], q)
    (q / "tunelab_train.json").write_text(json.dumps({"config": {"lora": {"quantize": "nf4"}}}))
    registry = AdapterRegistry()
    with caplog.at_level(logging.WARNING, logger="tunelab.serve"):
        registry.register("plain", adapters["lora-a"])
        assert not caplog.records
        registry.register("q", q)
    assert len(caplog.records) == 1 and "'q' was trained on the nf4 base" in caplog.text
    assert "tunelab merge" in caplog.text
