"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure the server sends.

Handlers turn FastAPI's 422 into 400, Starlette's 404/405 into the same shape, and anything unexpected into a
500 that names the request id (the stack trace goes to the log, never to the client).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy_engine.request import ErrorCode

logger = logging.getLogger("proxy_serve")
ModelT = TypeVar("ModelT", bound=BaseModel)

_DEFAULT_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class ErrorResponse(JSONResponse):
    """An error body in ASCII JSON: a message that quotes request input (a lone surrogate, say) always encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _DEFAULT_TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return ErrorResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, *, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def internal_error(request_id: str | None = None) -> APIError:
    request_id = request_id or f"req-{uuid.uuid4().hex}"
    return APIError(
        500, f"internal server error (request id {request_id})", code=ErrorCode.INTERNAL_ERROR,
        headers={"x-request-id": request_id},
    )


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "null"}


def _is_union_tag(part: Any) -> bool:
    """pydantic names the member of a union that failed (``str``, ``list[int]``) inside an error's location."""
    return isinstance(part, str) and (part in _TYPE_NAMES or "[" in part or part.startswith("function-"))


def _location(loc: tuple[Any, ...]) -> str:
    """``('body', 'messages', 0, 'content')`` -> ``messages[0].content``."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    text = ""
    for part in parts:
        if _is_union_tag(part):
            break
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line for a list of pydantic errors, and the first offending parameter."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"malformed JSON body{': ' + str(detail) if detail else ''}", None
    messages: dict[str, str] = {}
    for error in errors:
        where = _location(tuple(error.get("loc", ())))
        if where in messages:  # several members of one union failed: say so once
            messages[where] = f"{where}: has an unsupported type or value"
        elif error.get("type") == "missing":
            messages[where] = f"'{where}' is required"
        elif not where:
            messages[where] = "the request body must be a JSON object (Content-Type: application/json)"
        else:
            messages[where] = f"{where}: {error.get('msg')}"
    lines = list(messages.values())
    more = f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""
    return "; ".join(lines[:5]) + more, next(iter(messages)) or None


Refusal = Callable[[RequestValidationError | APIError], Response]


async def refused_as(refusal: Refusal, answer: Callable[[], Awaitable[Response]]) -> Response:
    """``answer()``, or its refusal (a body that does not parse, an ``APIError``) as ``refusal`` shapes it: another
    API's error shape (TGI's, Anthropic's)."""
    try:
        return await answer()
    except (RequestValidationError, APIError) as error:
        return refusal(error)


def shaped_route(refusal: Refusal) -> type[APIRoute]:
    """A route class whose refusals ``refusal`` answers (``refused_as``), on another API's routes."""

    class ShapedRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            handler = super().get_route_handler()

            async def shaped(request: Request) -> Response:
                return await refused_as(refusal, lambda: handler(request))

            return shaped

    return ShapedRoute


def validated(model: type[ModelT], body: Any) -> ModelT:
    """``body`` as ``model``, for a route that reads its JSON before it knows the model (/tokenize serves vLLM's
    and TGI's); a mismatch raises FastAPI's own error, which the app's handler answers as any other body's."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None


class UnexpectedErrors:
    """Turns an unexpected exception into the OpenAI-shaped 500 *inside* the CORS middleware.

    Starlette answers a handler for ``Exception`` from its outermost middleware, outside CORS: the 500 then
    carries no ``Access-Control-Allow-Origin`` and a browser frontend shows a CORS failure instead of the
    error. Once a response has started (a stream), nothing can be sent in its place: the error propagates.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            await _logged_internal_error(exc).response()(scope, receive, send)


def _logged_internal_error(exc: BaseException) -> APIError:
    error = internal_error()
    logger.error("unhandled error (%s)", error.headers["x-request-id"], exc_info=exc)
    return error


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(exc.errors()))
        return bad_request(message, param).response()

    @app.exception_handler(json.JSONDecodeError)
    async def _json_error(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return bad_request(f"malformed JSON body: {exc.msg}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(exc.status_code)
        return APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)  # the last resort, for an error outside ``UnexpectedErrors``
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _logged_internal_error(exc).response()
