"""Optional Bearer API keys. Only the routes that need a key depend on this, so CORS preflight (OPTIONS),
``/health`` and ``/metrics`` never ask for one. Keys are compared in constant time and never logged."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from server.errors import APIError


def api_key_dependency(keys: list[str]) -> Callable[[Request], Awaitable[None]]:
    encoded = [key.encode() for key in keys]

    async def check(request: Request) -> None:
        if not encoded:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        given = token.strip().encode()
        matched = False
        for key in encoded:  # no early exit: the time taken does not tell which key came close
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise _unauthorized("incorrect API key")

    return check


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
