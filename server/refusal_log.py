"""``RefusalLog``: one line on ``proxy_serve.requests`` for each request answered with an error before any generation
began, whichever layer answered it (the key check, the Host and Content-Type guards, body validation, an unknown
path, a draining server):

    refused POST /v1/chat/completions status=400 error='temperature: Input should be a valid number, ...'

The generation routes write their own line for every request they take, refused or not (with its id and model);
what was answered before them left no trace in the log, so a frontend's misconfiguration (a wrong key, a field out
of range) showed only in the frontend's own log, and chat frontends hide a failed background task (a title, tags).
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_logger = logging.getLogger("proxy_serve.requests")  # the generation routes' request lines go here too

LOGGED = "proxy_serve.request_logged"  # in the scope's state: a generation route writes this request's line
# Its 503 says "loading" or "draining" to probes that poll every few seconds: a state, not a refused request.
UNLOGGED_PATHS = frozenset({"/health"})
MAX_ERROR_BYTES = 4096  # of an error body read back for its message (errors are small; a stream is never read)


def mark_logged(scope: Scope) -> None:
    """The route writes this request's line itself: the middleware adds none."""
    scope.setdefault("state", {})[LOGGED] = True


def error_message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-shaped error body, or the body itself as text."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")


class RefusalLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLOGGED_PATHS:
            await self.app(scope, receive, send)
            return
        status, body = 0, bytearray()

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400:
                body.extend(message.get("body", b"")[: MAX_ERROR_BYTES - len(body)])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            if status >= 400 and not scope.get("state", {}).get(LOGGED):
                request_logger.info("refused %s %s status=%d error=%.300r", scope["method"], scope["path"], status,
                                    error_message(bytes(body)))
