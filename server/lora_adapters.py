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
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from proxy_engine.adapter import ADAPTER_CONFIG, adapter_pair, find_adapter
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


class AdapterLoader:
    """Loads and unloads adapters, one change at a time (each reads the pairs the previous one left): the
    endpoints' and the resolver's."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.changing = asyncio.Lock()
        # The adapters loaded while serving, least recently used first (max_cpu_loras evicts from the front).
        self.recency: dict[str, None] = {}

    def _taken_up(self, pairs: list[ExpertPairConfig]) -> None:
        # The engine's pairs (in this process, the same list already). A new model id's sampling defaults are read
        # on its first request (ServerContext.defaults_for).
        self.ctx.settings.engine.experts = list(pairs)

    async def load(self, body: LoadLoRAAdapterRequest) -> None:
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
            if index is not None and not body.load_inplace:
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
            if index is None:
                await self._make_room()
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
            self.recency.pop(name, None)
            self.recency[name] = None
        logger.info("loaded LoRA adapter %r from %s over %s (alpha %g)", name, adapter, pair.anti_expert.path,
                    body.alpha)

    async def unload(self, name: str) -> None:
        async with self.changing:
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
        """Under ``changing``: unload the least recently used adapters loaded while serving until one more fits
        ``max_cpu_loras`` (their running requests finish first)."""
        limit = self.ctx.settings.max_cpu_loras
        while limit is not None and len(self.recency) >= limit:
            oldest = next(iter(self.recency))
            logger.info("unloading LoRA adapter %r, the least recently used, to keep %d loaded (max_cpu_loras)",
                        oldest, limit)
            await self._remove(oldest)

    async def resolve_model(self, model: str | None) -> tuple[str, Target]:
        """``ServerContext.resolve_model``, after loading ``DIR/model`` as the adapter ``model`` when the server does
        not serve that id and the resolver's directory holds it (vLLM's filesystem resolver); the adapter it names,
        if loaded while serving, becomes the most recently used (max_cpu_loras)."""
        try:
            served = self.ctx.resolve_model(model)
        except APIError:
            path = self._resolvable(model)
            if path is None:
                raise  # an unknown id stays a 404
            await self._load_resolved(model, path)
            served = self.ctx.resolve_model(model)
        self._used(served[1])
        return served

    def _resolvable(self, model: str | None) -> Path | None:
        """The resolver's directory of adapter ``model``, when it has one."""
        directory = self.ctx.settings.lora_resolver_dir
        if directory is None or not model or not _RESOLVABLE.fullmatch(model):
            return None
        path = Path(directory).expanduser() / model
        return path if (path / ADAPTER_CONFIG).is_file() else None

    async def _load_resolved(self, model: str, path: Path) -> None:
        self.ctx.check_available()  # still loading, draining, failed: the 503 the request would get anyway
        logger.info("model %r is not served: loading it from the LoRA resolver's directory (%s)", model, path)
        try:
            await self.load(LoadLoRAAdapterRequest(lora_name=model, lora_path=str(path)))
        except APIError as error:
            try:  # loaded meanwhile by a request that raced this one ("already loaded")
                self.ctx.resolve_model(model)
            except APIError:
                raise APIError(error.status, f"model {model!r} is an adapter in the LoRA resolver's directory that "
                               f"did not load: {error.message}", param="model", code=error.code) from None

    def _used(self, target: Target) -> None:
        if target.pair is not None and self.recency:
            name = self.ctx.settings.engine.experts[target.pair].name
            if name in self.recency:
                self.recency.pop(name)
                self.recency[name] = None


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
