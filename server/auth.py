"""Optional API keys (``Authorization: Bearer``, or ``x-api-key`` as Anthropic's clients send them), checked by
``ApiKeyGate`` (an ASGI middleware) before anything reads the body, so
that a client without the key gets 401 whatever it sent (never a 400 about a body it may not send). CORS
preflight (OPTIONS), ``/health``, ``/metrics``, ``/version`` and the playground's static files (server/playground.py:
its API calls carry the key) never ask for one; ``/docs`` and
``/openapi.json`` do when keys are set. Keys are compared in constant time and never logged: the given key and
every accepted one are hashed to 32 bytes first, so that the comparison takes the same time whatever their
lengths, and every accepted key is compared, so that it does not tell which one came close.

The gate also says which key a request came with: ``tenant(request)`` is a digest of the key (never the key),
which scopes stored responses and, by default, salts the prefix cache (docs/security.md). Without keys every
request is the same tenant (None)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy_engine.request import ErrorCode
from server.errors import APIError
from server.playground import is_playground

# Paths any client may read: probes and scrapers carry no key.
PUBLIC_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})
TENANT = "proxy_serve_tenant"  # the key of the request's tenant id in the ASGI scope's state


class KeyChecker:
    """``check(authorization_header)`` raises the 401 unless the header carries an accepted key."""

    def __init__(self, keys: list[str]) -> None:
        self.digests = [_digest(key.encode()) for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def check(self, authorization: str) -> str | None:
        """The caller's tenant id (a digest of its key), or None when no key is needed; 401 without a good key."""
        if not self.digests:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')")
        given = _digest(token.strip().encode())
        matched = False
        for digest in self.digests:  # no early exit: the time taken does not tell which key came close
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise _unauthorized("incorrect API key")
        return given.hex()


class ApiKeyGate:
    """Refuses a request without an accepted key (401) before the app, and so before its body is read.
    ``refusals``: the paths of another API (TGI's, Anthropic's) and how it shapes the refusal; OpenAI's elsewhere."""

    def __init__(self, app: ASGIApp, keys: list[str],
                 refusals: Mapping[str, Callable[[APIError], Response]] | None = None) -> None:
        self.app = app
        self.checker = KeyChecker(keys)
        self.refusals = refusals or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and self.checker.enabled and scope["method"] != "OPTIONS"
                and scope["path"] not in PUBLIC_PATHS and not is_playground(scope["path"])):
            headers = dict(scope.get("headers") or [])
            header = headers.get(b"authorization", b"")
            if not header and headers.get(b"x-api-key"):  # Anthropic's clients send the key so
                header = b"Bearer " + headers[b"x-api-key"]
            try:
                tenant = self.checker.check(header.decode("latin-1"))
            except APIError as error:
                refusal = self.refusals.get(scope["path"])
                await (refusal(error) if refusal is not None else error.response())(scope, receive, send)
                return
            scope.setdefault("state", {})[TENANT] = tenant
        await self.app(scope, receive, send)


def tenant(request: Request) -> str | None:
    """Who made the request: a digest of its API key (set by ``ApiKeyGate``), or None on a server without keys."""
    return request.scope.get("state", {}).get(TENANT)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code=ErrorCode.INVALID_API_KEY, headers={"WWW-Authenticate": "Bearer"})
