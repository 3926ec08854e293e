"""HTTP routes: thin wrappers that hand the parsed request to ``OpenAIServing``. The keys are checked before
this, in ``app.KeyCheck`` (a middleware, so that a request without the key is refused before its body is read)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tunelab.serve.protocol import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest,
                                    ErrorResponse, Health, ModelCard, ModelList, RegisterAdapterRequest)
from tunelab.serve.serving import OpenAIServing

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}
_STREAM_DOC = {"description": "with `stream: true`: server-sent events, one chunk per `data:` line, "
                              "ending with `data: [DONE]`", "content": {"text/event-stream": {}}}


def serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


v1 = APIRouter(prefix="/v1", responses=_ERRORS)
admin = APIRouter(prefix="/admin", responses={**_ERRORS, 403: {"model": ErrorResponse}}, tags=["admin"])
public = APIRouter()


@v1.post("/chat/completions", response_model=ChatCompletion, responses={200: _STREAM_DOC}, tags=["openai"])
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """Creates a model response for the given chat conversation (OpenAI's `POST /v1/chat/completions`)."""
    return await serving(request).chat(body, request)


@v1.post("/completions", response_model=Completion, responses={200: _STREAM_DOC}, tags=["openai"])
async def create_completion(body: CompletionRequest, request: Request):
    """Creates a completion for the given prompt (OpenAI's legacy `POST /v1/completions`)."""
    return await serving(request).completions(body, request)


@v1.get("/models", response_model=ModelList, tags=["openai"])
async def list_models(request: Request) -> ModelList:
    """The base model and every registered adapter; send an adapter's id as `model` to use it."""
    return serving(request).models()


@v1.get("/models/{model:path}", response_model=ModelCard, tags=["openai"])
async def retrieve_model(model: str, request: Request) -> ModelCard:
    s = serving(request)
    return s.model_card(s.resolve(model))


@admin.post("/adapters", response_model=ModelCard, status_code=201)
async def register_adapter(body: RegisterAdapterRequest, request: Request) -> ModelCard:
    """Register a LoRA adapter directory (under one of the server's `--adapter-root` directories) under a model
    name; it loads on its first request. Needs the admin key (`TUNELAB_ADMIN_KEY`)."""
    return serving(request).register_adapter(body.name, body.path)


@admin.delete("/adapters/{name:path}")
async def unregister_adapter(name: str, request: Request) -> dict:
    """Remove an adapter; running requests that use it finish first. Needs the admin key."""
    return serving(request).unregister_adapter(name)


@public.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["ops"])
async def health(request: Request):
    """Liveness and load (no key needed): 200 while the engine runs, 503 when it does not."""
    h = serving(request).health()
    return h if h.status == "ok" else JSONResponse(h.model_dump(), status_code=503)
