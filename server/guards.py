"""Web-exposure guards, as ASGI middlewares in front of the app.

- ``HostAllowList``: a request whose ``Host`` header is not allowed gets 403. Without an API key a server on
  localhost is reachable from any web page the user opens, through DNS rebinding (a page's own host name
  re-pointed at 127.0.0.1, as in Ollama's CVE-2024-28224): the browser then sends the attacker's name as
  ``Host``, which this refuses. Default: localhost names only when no key is set, any host when one is.
- ``StrictJSON``: a POST body must declare ``Content-Type: application/json`` (415 otherwise). A web page can
  send a ``text/plain`` POST cross-origin without a CORS preflight; a JSON one needs the preflight, which CORS
  then refuses.
- ``ShapedCORS``: Starlette's CORS middleware, but a refused preflight is an OpenAI-shaped 400.
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy_engine.request import ErrorCode
from server.errors import APIError

logger = logging.getLogger("proxy_serve")

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
# Probes and scrapers reach a pod by its IP address: these answer whatever the Host (they hold no secret).
HOST_EXEMPT_PATHS = frozenset({"/health", "/metrics"})
JSON_SUBTYPES = ("json",)


def default_allowed_hosts(has_keys: bool) -> list[str]:
    return ["*"] if has_keys else [*LOCAL_HOSTS, "*.localhost"]


def host_name(host: str) -> str:
    """``Host`` header value without its port, lower-cased (``[::1]:8000`` -> ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, allowed: list[str]) -> bool:
    name = host_name(host)
    for pattern in allowed:
        pattern = pattern.strip().lower()
        if pattern == "*" or pattern == host.strip().lower() or pattern == name:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


class HostAllowList:
    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = allowed
        self.any = "*" in allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.any and scope["path"] not in HOST_EXEMPT_PATHS:
            host = Headers(scope=scope).get("host", "")
            if not host_allowed(host, self.allowed):
                logger.warning("refused a request for host %r (not in allowed_hosts)", clip(host, 80))
                error = APIError(403, f"host {clip(host, 80)!r} is not allowed: set allowed_hosts (or an API key) "
                                 "to serve it", code=ErrorCode.HOST_NOT_ALLOWED)
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


# POSTs that read no body (vLLM's probe; cancelling a background response, which names an unguessable id its
# owner holds): nothing for a web page to smuggle in.
BODYLESS_POSTS = frozenset({"/ping"})


def bodyless(path: str) -> bool:
    return path in BODYLESS_POSTS or (path.startswith("/v1/responses/") and path.endswith("/cancel"))


class StrictJSON:
    """415 for a POST without a JSON content type (before its body is read)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not bodyless(scope["path"]):
            content_type = Headers(scope=scope).get("content-type", "")
            if not is_json(content_type):
                given = f"'{clip(content_type, 60)}'" if content_type else "none"
                error = APIError(415, f"the request body must be JSON with 'Content-Type: application/json' "
                                 f"(got {given})", code=ErrorCode.UNSUPPORTED_MEDIA_TYPE)
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ShapedCORS(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        reason = bytes(response.body).decode("utf-8", "replace")  # "Disallowed CORS origin, method"
        shaped = APIError(400, f"CORS preflight refused: {reason.removeprefix('Disallowed CORS ')} not allowed "
                          "(allowed_origins)", code=ErrorCode.CORS_REFUSED).response()
        for name, value in response.headers.items():
            if name.lower() not in ("content-type", "content-length"):
                shaped.headers[name] = value
        return shaped


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: a refusal quoting a 4 MB field stays short."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
