"""``create_app(engine, settings)``: the FastAPI app around one engine, with no module-level state.

Start-up loads the models in the background (``/health`` answers 503 "loading" meanwhile); shutdown drains
(``/health`` answers "draining", new requests 503) and then shuts the engine down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy_engine.async_engine import AsyncEngine
from proxy_engine.config import ModelConfig
from proxy_engine.request import ErrorCode
from server import anthropic, tgi
from server.auth import ApiKeyGate
from server.errors import APIError, UnexpectedErrors, install_error_handlers
from server.guards import HostAllowList, ShapedCORS, StrictJSON, default_allowed_hosts
from server.playground import mount_playground
from server.refusal_log import RefusalLog
from server.routes import build_router, package_version
from server.serving import ServerContext
from server.settings import ServerSettings

logger = logging.getLogger("proxy_serve")


class BodySizeLimit:
    """Refuses request bodies past ``max_bytes`` with an OpenAI-shaped 413, whether or not they declare a length.

    The body is read here (it is small by construction) and replayed to the app, after which the app's
    ``receive`` is the server's again, so disconnect detection keeps working.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s  # longest wait for the next piece of the body (408 past it)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                error = APIError(408, f"the request body did not arrive within {self.timeout_s:g}s (body_timeout_s)",
                                 code=ErrorCode.REQUEST_TIMEOUT, headers={"Connection": "close"})
                await error.response()(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"request body is larger than the limit of {self.max_bytes} bytes",
                         code=ErrorCode.REQUEST_TOO_LARGE)
        await error.response()(scope, receive, send)


def create_app(
    engine: AsyncEngine,
    settings: ServerSettings,
    *,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app serving ``engine``; ``on_load_failure`` lets the CLI exit if loading fails."""
    ctx = ServerContext(engine=engine, settings=settings)

    async def load() -> None:
        try:
            await engine.start()
        except Exception as error:  # reported in one line; the CLI decides whether to exit
            ctx.load_error = f"{type(error).__name__}: {error}"
            logger.error("failed to load the models: %s", ctx.load_error)
            if on_load_failure is not None:
                on_load_failure(error)
            return
        log_loaded(ctx)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            ctx.drain()
            if not loading.done():
                loading.cancel()
            if engine.ready:
                await engine.shutdown()

    keys = settings.api_key_values()
    allowed_hosts = settings.allowed_hosts or default_allowed_hosts(bool(keys))
    middleware = [Middleware(RefusalLog)]  # outermost: sees every layer's refusal
    middleware.append(Middleware(HostAllowList, allowed=allowed_hosts))
    if settings.allowed_origins:
        middleware.append(Middleware(
            ShapedCORS,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],  # preflight echoes what the browser asks for, Authorization included
            expose_headers=["x-request-id", "retry-after"],
        ))
    # Inside CORS: a 401 keeps its CORS headers. TGI's and Anthropic's paths refuse in their API's shape.
    refusals = {**dict.fromkeys(tgi.PATHS, tgi.refusal), **dict.fromkeys(anthropic.PATHS, anthropic.refusal)}
    middleware.append(Middleware(ApiKeyGate, keys=keys, refusals=refusals))
    middleware.append(Middleware(UnexpectedErrors))  # inside CORS: a 500 keeps its CORS headers
    middleware.append(Middleware(StrictJSON))
    middleware.append(Middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s))

    app = FastAPI(
        title="proxy-serve",
        version=package_version(),
        description="OpenAI-compatible server for proxy-tuned language models.",
        lifespan=lifespan,
        middleware=middleware,
        strict_content_type=True,  # StrictJSON answers first, with a 415
        **({} if settings.fastapi_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}),
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(build_router(ctx))
    mount_playground(app)
    return app


def log_loaded(ctx: ServerContext) -> None:
    config = ctx.settings.engine
    info = ctx.info

    def where(model: ModelConfig) -> str:
        adapter = f" + adapter {model.adapter}" if model.adapter else ""
        return f"{model.path}{adapter} on {model.device} ({model.dtype}, {model.prompt_format} prompts)"

    logger.info("base: %s", where(config.base))
    for i, pair in enumerate(config.experts):
        logger.info("pair %d: expert %s; anti-expert %s; alpha %g", i, where(pair.expert), where(pair.anti_expert),
                    pair.alpha)
    aliases = ctx.settings.served_model_aliases
    logger.info("ready: serving %s%s (max_model_len %d, vocab %d)", ", ".join(ctx.settings.model_ids),
                f"; also as {', '.join(aliases)}" if aliases else "", info.max_model_len, info.vocab_size)
