"""Build the FastAPI app for one base model and its adapters, and run it (in the foreground or a thread)."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
import time
from pathlib import Path

from fastapi import FastAPI
from starlette.exceptions import HTTPException

from tunelab import __version__
from tunelab.errors import ConfigError, ModelError
from tunelab.models.adapters import BaseInfo
from tunelab.serve.adapters import AdapterError, AdapterRegistry
from tunelab.serve.config import ServeConfig
from tunelab.serve.engine import Engine
from tunelab.serve.errors import APIError, error_body, install_error_handlers
from tunelab.serve.router import admin, public, v1
from tunelab.serve.serving import OpenAIServing

log = logging.getLogger("tunelab.serve")

DESCRIPTION = """An OpenAI-compatible server over one base model and any number of LoRA adapters.
Send an adapter's name as `model` to use it; `GET /v1/models` lists what is served."""


PUBLIC_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


async def send_error(send, err: APIError) -> None:
    """Answer an ASGI request with an OpenAI-shaped error (from a middleware, outside FastAPI's handlers)."""
    body = json.dumps(error_body(err.status, err.message, param=err.param, code=err.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _bearer(scope) -> str | None:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


def check_key(scope, key: str, what: str = "API key") -> None:
    """401 unless the request carries ``Authorization: Bearer <key>`` (compared in constant time, never echoed)."""
    token = _bearer(scope)
    if token is None:
        raise APIError(401, f"You didn't provide an {what}. Send it in an 'Authorization: Bearer <key>' header.",
                       code="missing_api_key")
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise APIError(401, f"Incorrect {what} provided.", code="invalid_api_key")


class KeyCheck:
    """ASGI middleware: the keys, checked before anything reads the request body.

    ``/admin/...`` needs the admin key and is off (403) on a server without one; the API key does not open it.
    Every other path but the public ones (``/health``, the docs) needs the API key when the server has one.
    The keys are read from ``app.state`` at each request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            state = scope["app"].state
            path = scope["path"]
            try:
                if path == "/admin" or path.startswith("/admin/"):
                    if state.admin_key is None:
                        raise APIError(403, "admin endpoints are off: start the server with TUNELAB_ADMIN_KEY "
                                            "set to enable them", code="admin_disabled")
                    check_key(scope, state.admin_key, "admin key (TUNELAB_ADMIN_KEY)")
                elif path not in PUBLIC_PATHS and state.api_key is not None:
                    check_key(scope, state.api_key)
            except APIError as e:
                return await send_error(send, e)
        return await self.app(scope, receive, send)


class AccessLogFilter(logging.Filter):
    """uvicorn's access log as docs/serve.md promises: method, path (no query string) and status; no client
    address, no headers."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5:  # (client, method, path, http version, status)
            _, method, path, _, status = record.args
            record.msg, record.args = '"%s %s" %s', (method, str(path).split("?", 1)[0], status)
        return True


def log_config() -> dict:
    """uvicorn's logging config with the access log through ``AccessLogFilter``."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["formatters"]["access"] = {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s"}
    cfg["filters"] = {"access": {"()": f"{__name__}.AccessLogFilter"}}
    cfg["handlers"]["access"]["filters"] = ["access"]
    return cfg


class BodyLimit:
    """ASGI middleware: answer 413 to a request body over ``max_bytes`` (declared or actually sent)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI passes an HTTPException through its body parsing
                    raise HTTPException(413, f"the request body is larger than this server accepts "
                                             f"({self.max_bytes} bytes)")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except HTTPException as e:  # raised outside a route (no handler saw it)
            if e.status_code != 413:
                raise
            await self._reject(send)

    async def _reject(self, send) -> None:
        import json

        body = json.dumps(error_body(413, f"the request body is larger than this server accepts "
                                          f"({self.max_bytes} bytes)", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def load_base(config: ServeConfig):
    """The base model. ``dtype: auto`` is float32 on a CPU: bf16 autocast makes a sequence's greedy output and
    log-likelihoods depend on what else is in its batch, and buys no decoding speed on CPUs (docs/serve.md)."""
    from tunelab.models.local import LocalModel, pick_device

    if config.model and str(config.model).startswith("openai:"):
        raise ModelError("tunelab serve needs a local base model (bundled, an HF directory or a .gguf file)")
    dtype = config.dtype
    if dtype == "auto" and pick_device(config.device).type == "cpu":
        dtype = "float32"
    return LocalModel(config.model, device=config.device, dtype=dtype)


def adapter_roots(config: ServeConfig) -> list[Path]:
    """The ``--adapter-root`` directories, resolved; one that is not a directory is a ConfigError."""
    roots = []
    for r in config.adapter_roots:
        p = Path(r).expanduser()
        if not p.is_dir():
            raise ConfigError(f"--adapter-root {r}: not a directory", where="<command line>")
        roots.append(p.resolve())
    return roots


def build_app(config: ServeConfig, lm=None) -> FastAPI:
    """The app; ``lm`` (a LocalModel the server may own and modify: adapters attach to it) defaults to
    loading ``config.model``. The engine thread starts and stops with the app's lifespan."""
    roots = adapter_roots(config)
    registry = AdapterRegistry()
    for name, path in config.adapters.items():  # checked before the (slower) model load
        try:
            registry.register(name, path)
        except AdapterError as e:
            raise ConfigError(str(e), where=f"--adapter {name}") from None
    lm = lm if lm is not None else load_base(config)
    registry.base = BaseInfo.of(lm.model, getattr(lm, "path", None))
    for entry in registry.entries():  # the base is known now: each adapter must fit it
        try:
            registry.check(entry.path)
        except AdapterError as e:
            raise ConfigError(str(e), where=f"--adapter {entry.name}") from None
    base_id = config.served_model_name or lm.name
    if registry.get(base_id) is not None:
        raise ConfigError(f"adapter name {base_id!r} is the base model's name; pick another", where="--adapter")
    engine = Engine(lm, registry, max_batch=config.max_batch, max_prefill_tokens=config.max_prefill_tokens,
                    max_loaded_adapters=config.max_loaded_adapters, max_concurrent=config.max_concurrent)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        h = app.state.serving.health()
        log.info("serving %s with %d adapter(s); max batch %d; %s", base_id, len(registry), config.max_batch,
                 precision_note(h.dtype, h.deterministic))
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="tunelab serve", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.serving = OpenAIServing(config, lm, engine, registry, adapter_roots=roots)
    app.state.api_key = config.api_key_value()
    app.state.admin_key = config.admin_key_value()
    app.state.engine = engine
    app.include_router(v1)
    app.include_router(admin)
    app.include_router(public)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(KeyCheck)  # added last, so it runs first: no key, no body read
    return app


def precision_note(dtype: str, deterministic: bool) -> str:
    """How the server computes, in words for its startup lines."""
    if deterministic:
        return f"{dtype}: greedy output does not depend on the batch"
    return f"{dtype}: greedy output and log-likelihoods may depend on the batch (--dtype float32 to avoid it)"


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, benchmarks, notebooks)::

        with ServerThread(build_app(ServeConfig())) as srv:
            OpenAI(base_url=srv.url + "/v1", api_key="-")...
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                     timeout_graceful_shutdown=5, log_config=log_config())
        self.server = uvicorn.Server(self.config)
        self._thread = threading.Thread(target=self.server.run, name="tunelab-serve", daemon=True)
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
