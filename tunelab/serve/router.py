"""HTTP routes: thin wrappers that check the key and hand the parsed request to ``OpenAIServing``."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from tunelab.serve.errors import APIError
from tunelab.serve.protocol import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest,
                                    ErrorResponse, Health, ModelCard, ModelList, RegisterAdapterRequest)
from tunelab.serve.serving import OpenAIServing

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}
_STREAM_DOC = {"description": "with `stream: true`: server-sent events, one chunk per `data:` line, "
                              "ending with `data: [DONE]`", "content": {"text/event-stream": {}}}


def serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


def require_api_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` when the server was started with a key; the key is never echoed."""
    key: str | None = request.app.state.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "You didn't provide an API key. Send it in an 'Authorization: Bearer <key>' header.",
                       code="missing_api_key")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_ERRORS)
admin = APIRouter(prefix="/admin", dependencies=[Depends(require_api_key)], responses=_ERRORS, tags=["admin"])
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


def _admin_enabled(request: Request) -> None:
    if request.app.state.api_key is None:
        raise APIError(403, "admin endpoints are disabled: start the server with --api-key "
                            "(or TUNELAB_API_KEY) to enable them", code="admin_disabled")


@admin.post("/adapters", response_model=ModelCard, status_code=201, dependencies=[Depends(_admin_enabled)])
async def register_adapter(body: RegisterAdapterRequest, request: Request) -> ModelCard:
    """Register a LoRA adapter directory under a model name; it loads on its first request."""
    return serving(request).register_adapter(body.name, body.path)


@admin.delete("/adapters/{name:path}", dependencies=[Depends(_admin_enabled)])
async def unregister_adapter(name: str, request: Request) -> dict:
    """Remove an adapter; running requests that use it finish first."""
    return serving(request).unregister_adapter(name)


@public.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["ops"])
async def health(request: Request):
    """Liveness and load (no key needed): 200 while the engine runs, 503 when it does not."""
    h = serving(request).health()
    return h if h.status == "ok" else JSONResponse(h.model_dump(), status_code=503)
