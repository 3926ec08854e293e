"""Every error leaves the server in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Status codes follow the OpenAI API: 400 for a bad request (including what FastAPI calls a 422 validation
error), 401 for a missing or wrong key, 404 for an unknown model or URL, 413 for a body over the limit,
429 when too many requests are in flight, 500 for a bug, 503 while the engine is down.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.serve.engine import EngineError

log = logging.getLogger("tunelab.serve")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """Raise anywhere in a handler to answer with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict:
    return {"error": {"message": message,
                      "type": type or _TYPES.get(status, "server_error" if status >= 500 else
                                                 "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, param=err.param, code=err.code, type=err.type),
                        status_code=err.status, headers=err.headers)


def from_engine(e: EngineError) -> APIError:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return APIError(e.status, e.message, code=e.code, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # pydantic names union branches in the location ("str", "list[...]"): keep the field path only
    loc = [x for x in loc if not (x.startswith(("list[", "function-")) or x in ("str", "int"))]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request: it is not valid JSON.", None
    if e.get("type") == "missing":
        msg = "required field is missing"
    msg = msg.removeprefix("Value error, ")
    more = len(errors) - 1
    text = f"{param}: {msg}" if param else msg
    return text + (f" (and {more} more error{'s' if more > 1 else ''})" if more else ""), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        return error_response(from_engine(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param, code="invalid_value" if param else None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method not allowed ({request.method} {request.url.path})"
        else:
            message = str(exc.detail)
        code = "request_too_large" if exc.status_code == 413 else None
        return error_response(APIError(exc.status_code, message, code=code,
                                       headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error ({type(exc).__name__})"))
