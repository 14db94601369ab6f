"""vLLM's runtime LoRA endpoints, ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``, where an
adapter is an expert over a checkpoint the server already runs, its anti-expert.

A loaded adapter ``NAME`` is an expert pair served under its name alone (``ProxyEngine.add_pair``): the model
id ``<served name>:NAME`` (and its bare ``NAME``, as vLLM serves a LoRA) is the base steered by that pair, and
``<served name>:NAME:expert`` the adapter's model alone. The model ids configured at start-up answer as before: a
loaded pair never joins the default combination.

Which checkpoint the adapter runs over (its anti-expert) and how it reads prompts: ``proxy_engine.adapter``'s
``adapter_pair``, which ``--lora-modules`` uses too; the request may name the checkpoint (``anti_expert``), the
``alpha`` and the ``prompt_format``.

Off unless the deployer allows it (``allow_runtime_lora_updating``, or vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``):
the endpoints read files from the server's disk. Off, they do not exist (404), as in vLLM.

With ``lora_resolver_dir`` (vLLM's filesystem resolver, ``VLLM_LORA_RESOLVER_CACHE_DIR``), a request naming a model
the server does not serve, ``NAME``, first loads ``DIR/NAME`` as the adapter ``NAME`` if it holds one (``resolve``),
then is answered by it; each replica of a scaled-out deployment loads what its own requests name.

``max_cpu_loras`` bounds the adapters held in memory, as vLLM's LoRA cache does, not the adapters served: one
evicted (the least recently used, once a load takes the count over the bound) stays registered, listed and
servable, and a request naming it loads it again. A request whose adapter is evicted between being resolved and
reaching the engine is sent again once the adapter is back (vLLM queues it), never answered 404.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from proxy_engine.adapter import ADAPTER_CONFIG, adapter_pair, find_adapter
from proxy_engine.async_engine import RequestStream
from proxy_engine.config import ExpertPairConfig, PromptFormat
from proxy_engine.request import EngineOverloadedError, ErrorCode, FieldError, PairNotFoundError, Target
from server.errors import APIError, bad_request
from server.guards import clip
from server.serving import ServerContext

logger = logging.getLogger("proxy_serve")


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's body, with this server's choices of a pair: its ``alpha``, ``prompt_format`` and ``anti_expert``."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False  # replace an adapter loaded earlier under this name (its files changed)
    alpha: float = Field(default=1.0, ge=-100, le=100)
    prompt_format: PromptFormat | None = Field(
        default=None, description="how the adapter's model reads prompts; default: as the configured experts do")
    anti_expert: str | None = Field(default=None, max_length=4096,
                                    description="the path of the running checkpoint the adapter is over")


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str | None = Field(default=None, min_length=1, max_length=64)
    lora_int_id: int | None = None  # vLLM's own number for an adapter: none is kept here


_RESOLVABLE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")  # a directory name under the resolver's: no path
_RESUBMITS = 3  # times a request is sent again after its adapter was evicted between resolving and submitting


class AdapterLoader:
    """Loads and unloads adapters, one change at a time (each reads the pairs the previous one left): the
    endpoints' and the resolver's."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.changing = asyncio.Lock()
        # The adapters loaded while serving, and how, least recently used first (max_cpu_loras evicts from the front).
        self.recency: dict[str, LoadLoRAAdapterRequest] = {}
        # Those evicted to keep within max_cpu_loras: still served, loaded again (as they were) on their next request.
        self.dormant: dict[str, LoadLoRAAdapterRequest] = {}

    def _taken_up(self, pairs: list[ExpertPairConfig]) -> None:
        # The engine's pairs (in this process, the same list already). A new model id's sampling defaults are read
        # on its first request (ServerContext.defaults_for).
        self.ctx.settings.engine.experts = list(pairs)

    async def load(self, body: LoadLoRAAdapterRequest, on_demand: bool = False) -> None:
        """Load an adapter (the endpoint's), or, ``on_demand``, one a request names (the resolver's, or a dormant
        one): a request that raced this one may have loaded it meanwhile, and then there is nothing to do."""
        ctx, name = self.ctx, body.lora_name
        if ctx.settings.names_of_model(name):
            raise bad_request(f"{name!r} is the served model's name: give the adapter another", "lora_name")
        adapter = find_adapter(body.lora_path)
        if adapter is None:
            raise APIError(404, f"No adapter found at {clip(body.lora_path, 200)!r}: a directory holding "
                           f"{ADAPTER_CONFIG} (or a hub id cached with one; this server never downloads)",
                           param="lora_path", code=ErrorCode.ADAPTER_NOT_FOUND)
        async with self.changing:
            index = ctx.settings.pair_named(name)
            if on_demand and index is not None:
                return
            # Registered, held or dormant: the endpoint replaces it only when told (a request reloads a dormant one).
            if not on_demand and not body.load_inplace and (index is not None or name in self.dormant):
                raise bad_request(f"The lora adapter '{name}' has already been loaded (load_inplace: true replaces "
                                  "it)", "lora_name")
            if index is not None and ctx.settings.engine.experts[index].in_default:
                raise bad_request(f"{name!r} names an expert pair of the default model, which cannot be replaced "
                                  "while serving", "lora_name")
            try:
                pair = adapter_pair(ctx.settings.engine, name, adapter, anti_expert=body.anti_expert,
                                    alpha=body.alpha, prompt_format=body.prompt_format)
            except FieldError as error:
                raise bad_request(str(error), error.param) from None
            try:
                pairs = await ctx.engine.add_pair(pair, replace=body.load_inplace)
            except (ValueError, ImportError) as error:
                raise bad_request(str(error), "lora_path") from None
            except EngineOverloadedError as error:  # the engine stopped meanwhile
                raise APIError(503, str(error), code=ErrorCode.ENGINE_FAILED) from None
            except Exception as error:  # noqa: BLE001 - no memory for its buffers, say: the engine serves on
                logger.exception("loading the LoRA adapter %r failed", name)
                raise APIError(500, f"loading the adapter failed ({type(error).__name__}: {error}); the server "
                               "serves on as before", code=ErrorCode.INTERNAL_ERROR) from None
            self._taken_up(pairs)
            self.dormant.pop(name, None)
            self.recency.pop(name, None)
            self.recency[name] = body
            logger.info("loaded LoRA adapter %r from %s over %s (alpha %g)", name, adapter, pair.anti_expert.path,
                        body.alpha)
            # Only now that it is in: a load that fails evicts nothing (vLLM's LoRA cache reads the adapter first
            # too). The evicted adapter's running requests finish before its memory goes.
            await self._make_room()

    async def unload(self, name: str) -> None:
        async with self.changing:
            if self.dormant.pop(name, None) is None:  # a dormant one is in no engine: it is forgotten, no more
                await self._remove(name)
        logger.info("unloaded LoRA adapter %r: its running requests finish first", name)

    async def _remove(self, name: str) -> None:
        try:
            pairs = await self.ctx.engine.remove_pair(name)
        except PairNotFoundError:
            raise APIError(404, f"The lora adapter '{clip(name, 64)}' cannot be found.", param="lora_name",
                           code=ErrorCode.ADAPTER_NOT_FOUND) from None
        except ValueError as error:
            raise bad_request(str(error), "lora_name") from None
        except EngineOverloadedError as error:
            raise APIError(503, str(error), code=ErrorCode.ENGINE_FAILED) from None
        self._taken_up(pairs)
        self.recency.pop(name, None)

    async def _make_room(self) -> None:
        """Under ``changing``: evict the least recently used adapters loaded while serving until they are within
        ``max_cpu_loras`` (their running requests finish first); each stays registered, dormant."""
        limit = self.ctx.settings.max_cpu_loras
        while limit is not None and len(self.recency) > limit:
            oldest = next(iter(self.recency))
            body = self.recency[oldest]
            logger.info("evicting LoRA adapter %r, the least recently used, to keep %d loaded (max_cpu_loras); its "
                        "next request loads it again", oldest, limit)
            await self._remove(oldest)
            self.dormant[oldest] = body

    async def resolve_model(self, model: str | None) -> tuple[str, Target]:
        """``ServerContext.resolve_model``, after loading the adapter ``model`` names when the server does not serve
        that id: a dormant adapter (evicted under max_cpu_loras) or ``DIR/model`` of the resolver's directory (vLLM's
        filesystem resolver). The adapter it names, if loaded while serving, becomes the most recently used."""
        try:
            served = self.ctx.resolve_model(model)
        except APIError:
            body = self._loadable(model)
            if body is None:
                raise  # an unknown id stays a 404
            await self._load_on_demand(model, body)
            served = self.ctx.resolve_model(model)
        self._used(served[1])
        return served

    async def submit(self, model: str | None, target: Target,
                     submit: Callable[[Target], Awaitable[RequestStream]]) -> RequestStream:
        """``submit(target)``; where the adapter it names was evicted meanwhile (a 404 from the engine), loaded
        again and sent again, as vLLM queues a request whose adapter left its cache. Bounded: adapters evicted
        as fast as they load (more in use than max_cpu_loras holds) end in the 404."""
        for _ in range(_RESUBMITS):
            try:
                return await submit(target)
            except APIError as error:
                if error.code != ErrorCode.MODEL_NOT_FOUND or target.pair is None:
                    raise
                _, target = await self.resolve_model(model)
        return await submit(target)

    def dormant_name(self, model: str) -> str | None:
        """The dormant adapter a model id names (``NAME``, ``<served>:NAME``, ``<served>:NAME:expert``), if any."""
        model = self.ctx.settings.canonical_model(model)
        prefix = f"{self.ctx.settings.served_model_name}:"
        for name in (model, model.removeprefix(prefix), model.removeprefix(prefix).removesuffix(":expert")):
            if name in self.dormant:
                return name
        return None

    def _loadable(self, model: str | None) -> LoadLoRAAdapterRequest | None:
        """How to load the adapter an unserved ``model`` names: a dormant one as it was, or the resolver's."""
        if not model:
            return None
        name = self.dormant_name(model)
        if name is not None:
            return self.dormant[name]
        path = self._resolvable(model)
        return None if path is None else LoadLoRAAdapterRequest(lora_name=model, lora_path=str(path))

    def _resolvable(self, model: str | None) -> Path | None:
        """The resolver's directory of adapter ``model``, when it has one."""
        directory = self.ctx.settings.lora_resolver_dir
        if directory is None or not model or not _RESOLVABLE.fullmatch(model):
            return None
        path = Path(directory).expanduser() / model
        return path if (path / ADAPTER_CONFIG).is_file() else None

    async def _load_on_demand(self, model: str, body: LoadLoRAAdapterRequest) -> None:
        self.ctx.check_available()  # still loading, draining, failed: the 503 the request would get anyway
        how = ("evicted earlier (max_cpu_loras)" if body.lora_name in self.dormant
               else "in the LoRA resolver's directory")
        logger.info("model %r names adapter %r, %s: loading it from %s", model, body.lora_name, how, body.lora_path)
        try:
            await self.load(body, on_demand=True)
        except APIError as error:
            raise APIError(error.status, f"model {clip(model, 100)!r} names an adapter {how} that did not load: "
                           f"{error.message}", param="model", code=error.code) from None

    def _used(self, target: Target) -> None:
        if target.pair is not None and self.recency:
            name = self.ctx.settings.engine.experts[target.pair].name
            if name in self.recency:
                self.recency[name] = self.recency.pop(name)


def add_lora_adapter_routes(router: APIRouter, ctx: ServerContext) -> AdapterLoader:
    """The two endpoints, when the settings allow them; the loader the resolver uses too."""
    loader = AdapterLoader(ctx)
    if not ctx.settings.allow_runtime_lora_updating:
        @router.post("/v1/load_lora_adapter", include_in_schema=False)
        @router.post("/v1/unload_lora_adapter", include_in_schema=False)
        async def switched_off() -> None:  # a 404, as vLLM's, that says how to turn them on
            raise APIError(404, "no such endpoint: runtime LoRA loading is off (serve with "
                           "--allow-runtime-lora-updating, or VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)",
                           code=ErrorCode.NOT_FOUND)

        return loader

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        ctx.check_available()
        await loader.load(body)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        ctx.check_available()
        if body.lora_name is None:
            raise bad_request("name the adapter with lora_name (lora_int_id is vLLM's internal number, which this "
                              "server does not keep)", "lora_name")
        await loader.unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return loader
