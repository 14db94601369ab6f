"""Optional Bearer API keys. Only the routes that need a key depend on this, so CORS preflight (OPTIONS),
``/health`` and ``/metrics`` never ask for one. Keys are compared in constant time and never logged: the
given key and every accepted one are hashed to 32 bytes first, so that the comparison takes the same time
whatever their lengths, and every accepted key is compared, so that it does not tell which one came close."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from proxy_engine.request import ErrorCode
from server.errors import APIError


def api_key_dependency(keys: list[str]) -> Callable[[Request], Awaitable[None]]:
    digests = [_digest(key.encode()) for key in keys]

    async def check(request: Request) -> None:
        if not digests:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        given = _digest(token.strip().encode())
        matched = False
        for digest in digests:  # no early exit: the time taken does not tell which key came close
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise _unauthorized("incorrect API key")

    return check


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code=ErrorCode.INVALID_API_KEY, headers={"WWW-Authenticate": "Bearer"})
