"""The HTTP endpoints. Each generation route reads the same way: resolve the model, convert the request,
submit it to the engine, then stream events or collect the whole answer while watching for a disconnect."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response

from proxy_engine.request import ErrorCode, FieldError, PromptInput, SamplingParams, Serves
from server import tgi
from server.anthropic import add_anthropic_routes
from server.auth import tenant
from server.errors import APIError, bad_request, validated
from server.guards import clip
from server.lora_adapters import add_lora_adapter_routes
from server.metrics import RequestTimer
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_logprobs,
    completion_logprobs,
    model_card,
    model_logprobs,
    now,
    prompt_logprobs,
)
from server.reasoning import Reasoning
from server.refusal_log import mark_logged
from server.responses import add_responses_routes
from server.serving import Generation, GenerationError, ServerContext, new_request_id, request_logger, request_shape
from server.streaming import EventStreamResponse, chat_events, completion_events, off_the_loop, token_ids_view

logger = logging.getLogger("proxy_serve")
T = TypeVar("T")


def package_version() -> str:
    try:
        return version("proxy-serve")
    except PackageNotFoundError:
        return "0+unknown"


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Awaitable[T], abort: Callable[[], None]) -> T:
    """``work``'s result; cancelled, with ``abort`` for what it may have started, and a 499, if the client leaves
    first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        abort()
        raise APIError(499, "the client closed the request before its answer was ready")
    finally:
        for future in (task, gone):
            future.cancel()


def _convert(build: Callable[[], T]) -> T:
    """Run a request conversion, turning the engine types' ``ValueError`` into a 400."""
    try:
        return build()
    except ValueError as error:  # a FieldError names its field
        raise bad_request(str(error), getattr(error, "param", None)) from None


def build_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()
    adapters = add_lora_adapter_routes(router, ctx)  # and the resolver that loads one a request names

    async def start(
        request_id: str,
        endpoint: str,
        model: str | None,
        prompt: Callable[[], PromptInput | list[PromptInput]],
        params: Callable[[], SamplingParams],
        http: Request,
        salt: str | None = None,
    ) -> tuple[Generation, list[PromptInput]]:
        """Resolve, convert and submit; a refusal is counted, logged and raised as its HTTP error. ``salt``: the
        request's prefix-cache salt (``ServerContext.cache_salt``). At debug level, each request's shape is logged
        too (what a frontend sends: keys, messages, tools, prompt tokens)."""
        timer = RequestTimer(ctx.metrics)
        mark_logged(http.scope)  # this request's line is written below if refused, by Generation.close otherwise
        served = "unknown"  # a label for refused requests that named no model we serve (bounded cardinality)
        shape = request_shape(await http.json()) if request_logger.isEnabledFor(logging.DEBUG) else None
        try:
            served, target = await adapters.resolve_model(model)
            prompt_input = _convert(prompt)
            sampling = _convert(params)
            submitting = adapters.submit(
                model, target, lambda target: ctx.submit(request_id, prompt_input, sampling, target, salt))
            # A beam search runs whole before its first byte: a client that leaves meanwhile stops it.
            stream = await (_unless_gone(http, submitting, lambda: ctx.engine.abort(request_id))
                            if sampling.beam_search else submitting)
        except APIError as error:
            if shape is not None:
                request_logger.debug("%s %s %s prompt_tokens=? (refused)", request_id, endpoint, shape)
            ctx.metrics.requests.labels(endpoint, served, str(error.status)).inc()
            request_logger.info("%s model=%s status=%d error=%r", request_id, served, error.status,
                                clip(error.message, 300))
            raise
        if shape is not None:
            request_logger.debug("%s %s %s prompt_tokens=%d", request_id, endpoint, shape, stream.prompt_tokens)
        prompts = prompt_input if isinstance(prompt_input, list) else [prompt_input]
        logged = [p.text if p.text is not None else (p.messages if p.messages is not None else p.token_ids)
                  for p in prompts]
        generation = Generation(ctx, stream, request_id=request_id, endpoint=endpoint, model=served, n=stream.n,
                                params=sampling,
                                timer=timer, prompt_log=logged[0] if len(logged) == 1 else logged)
        return generation, prompts

    async def collect(generation: Generation, request: Request) -> bool:
        """Run the generation to its end; False if the client left first (the request is then aborted); raises the
        request's HTTP error if it failed."""
        work = asyncio.ensure_future(generation.run_to_end())
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                try:
                    work.result()
                except GenerationError:  # 500 (engine fault), 504 (timeout) or 503 (shutdown), naming the request
                    raise generation.api_error() from None
                return True
            return False
        finally:
            for task in (work, gone):
                task.cancel()
            generation.close()

    def server_defaults(body: CompletionRequest | ChatCompletionRequest) -> None:
        """The fields a request leaves out that the command line sets for every request (vLLM's flags)."""
        if body.return_tokens_as_token_ids is None:
            body.return_tokens_as_token_ids = ctx.settings.return_tokens_as_token_ids

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        server_defaults(body)
        request_id = new_request_id("cmpl", request.headers.get("x-request-id"))
        generation, prompts = await start(request_id, "completions", body.model, body.prompt_input,
                                          lambda: body.sampling_params(ctx.defaults_for(body.model)), request,
                                          ctx.cache_salt(tenant(request), body.cache_salt))
        created = now()
        echo: list[str] | None = None  # per choice: choice k answers prompt k // n
        if body.echo:
            try:
                texts = [p.text if p.text is not None else ctx.engine.detokenize(p.token_ids or []) for p in prompts]
            except BaseException:
                generation.close("error")
                raise
            per_prompt = len(generation.choices) // len(prompts)
            echo = [texts[k // per_prompt] for k in range(len(generation.choices))]
        headers = {"x-request-id": request_id}
        if body.stream:
            events = completion_events(generation, created=created, echo=echo, include_usage=body.include_usage,
                                       prompt_logprobs=body.wants_prompt_logprobs,
                                       continuous_usage=body.continuous_usage, ids=token_ids_view(body))
            return EventStreamResponse(events, generation.close, headers)
        if not await collect(generation, request):
            return Response(status_code=499)

        def answer() -> dict[str, Any]:
            choices = []
            for choice in generation.choices:
                prefix = echo[choice.index] if echo else ""
                logprobs = None
                if body.logprobs is not None:
                    echoed = choice.prompt_logprobs if body.wants_prompt_logprobs else None
                    logprobs = completion_logprobs(choice.logprobs, len(prefix), echoed,
                                                   bool(body.return_tokens_as_token_ids), body.logprobs)
                entry = {"index": choice.index, "text": prefix + choice.text, "logprobs": logprobs,
                         "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
                if body.prompt_logprobs is not None:
                    entry["prompt_logprobs"] = prompt_logprobs(choice.prompt_logprobs or [], body.prompt_logprobs)
                if body.return_token_ids:
                    entry |= {"prompt_token_ids": generation.prompt_ids(choice.index), "token_ids": choice.token_ids}
                if body.model_logprobs is not None:
                    entry["model_logprobs"] = model_logprobs(choice.model_logprobs)
                choices.append(entry)
            return {"id": request_id, "object": "text_completion", "created": created, "model": generation.model,
                    "choices": choices, "usage": generation.usage()}

        if body.logprobs is None and body.model_logprobs is None and body.prompt_logprobs is None:
            return JSONResponse(answer(), headers=headers)
        return await off_the_loop(answer, headers)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        server_defaults(body)
        request_id = new_request_id("chatcmpl", request.headers.get("x-request-id"))
        fmt = ctx.tool_call_format
        generation, _ = await start(request_id, "chat", body.model, lambda: body.prompt_input(fmt),
                                    lambda: body.sampling_params(fmt, ctx.defaults_for(body.model),
                                                                 ctx.max_logprobs, ctx.settings.reasoning_parser),
                                    request,
                                    ctx.cache_salt(tenant(request), body.cache_salt))
        plan = body.tool_plan(fmt)
        configured = ctx.settings.reasoning_parser
        reasoning = Reasoning(body.reasoning_parser(configured, fmt), configured is not None, body.include_reasoning)
        created = now()
        headers = {"x-request-id": request_id}
        echo = body.echoed()
        if body.stream:
            events = chat_events(generation, created=created, include_usage=body.include_usage, plan=plan,
                                 continuous_usage=body.continuous_usage, reasoning=reasoning, ids=token_ids_view(body),
                                 echo=echo)
            return EventStreamResponse(events, generation.close, headers)
        if not await collect(generation, request):
            return Response(status_code=499)

        def answer() -> dict[str, Any]:
            choices = []
            for c in generation.choices:
                message, reason = reasoning.message(plan, c.text, c.finish_reason)
                if echo:
                    message["content"] = echo + (message["content"] or "")
                logprobs = chat_logprobs(c.logprobs, bool(body.return_tokens_as_token_ids)) if body.logprobs else None
                entry = {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": reason,
                         "stop_reason": c.stop_reason}
                if body.model_logprobs is not None:
                    entry["model_logprobs"] = model_logprobs(c.model_logprobs)
                if body.return_token_ids:
                    entry["token_ids"] = c.token_ids
                choices.append(entry)
            extra = {"prompt_token_ids": generation.prompt_ids(0)} if body.return_token_ids else {}
            if body.prompt_logprobs is not None:  # vLLM's place for them in chat: the response, not a choice
                extra["prompt_logprobs"] = prompt_logprobs(generation.choices[0].prompt_logprobs or [],
                                                           body.prompt_logprobs)
            return {"id": request_id, "object": "chat.completion", "created": created, "model": generation.model,
                    "choices": choices, "usage": generation.usage(reasoning.parser, reasoning=True),
                    **extra}

        if body.model_logprobs is None and body.prompt_logprobs is None:
            return JSONResponse(answer(), headers=headers)
        return await off_the_loop(answer, headers)

    def cards() -> list[dict[str, Any]]:
        settings = ctx.settings
        max_len = ctx.info.max_model_len if ctx.engine.ready else None
        pairs = settings.engine.experts
        listed = []
        for model_id, target in settings.model_routes.items():
            parent = None if model_id == settings.served_model_name else settings.served_model_name
            if target.serves is Serves.EXPERT:  # named by its adapter if it is one (vLLM names a LoRA module so)
                expert = pairs[target.expert_pair].expert
                listed.append(model_card(model_id, ctx.created, expert.adapter or expert.path, max_len, parent))
                continue
            card = model_card(model_id, ctx.created, settings.engine.base.path, max_len, parent)
            if target.serves is Serves.PROXY:
                # The default strength per expert pair it runs: what a request's ``alpha`` overrides (the
                # playground builds one slider per pair from it).
                steering = settings.engine.default_pairs if target.pair is None else [target.pair]
                card["alpha"] = [pairs[i].alpha for i in steering]
            listed.append(card)
            if model_id == settings.served_model_name:  # vLLM lists every served name (its parts by the id only)
                listed += [{**card, "id": alias, "display_name": alias} for alias in settings.served_model_aliases]
        for name, body in adapters.dormant.items():  # evicted under max_cpu_loras: served still, as vLLM lists them
            model_id = f"{settings.served_model_name}:{name}"
            card = model_card(model_id, ctx.created, settings.engine.base.path, max_len, settings.served_model_name)
            listed += [{**card, "alpha": [body.alpha]},
                       model_card(f"{model_id}:expert", ctx.created, body.lora_path, max_len,
                                  settings.served_model_name)]
        return listed

    add_responses_routes(router, ctx, start, collect)
    add_anthropic_routes(router, ctx, start, collect)
    tgi_generate = tgi.add_tgi_routes(router, ctx, start, collect, package_version())

    # SageMaker's inference path (with GET /ping), as vLLM's and TGI's containers serve it: the body says which API
    # it speaks. SageMaker sends the container's requests to port 8080 (--port 8080).
    @router.post("/invocations")
    async def invocations(raw: Annotated[dict[str, Any], Body()], request: Request) -> Response:
        if "messages" in raw:
            return await chat_completions(validated(ChatCompletionRequest, raw), request)
        if "prompt" in raw:
            return await completions(validated(CompletionRequest, raw), request)
        if "inputs" in raw:
            return await tgi_generate(raw, request)
        raise bad_request("an /invocations body holds messages (a chat completion), prompt (a completion) or "
                          "inputs (TGI's generate)", "messages")

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        listed = cards()  # OpenAI's list, with the paging fields Anthropic's clients read (one page: all of them)
        return {"object": "list", "data": listed, "has_more": False, "first_id": listed[0]["id"] if listed else None,
                "last_id": listed[-1]["id"] if listed else None}

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if (dormant := adapters.dormant_name(model_id)) is not None:  # evicted: its card, without loading it
            listed = f"{ctx.settings.served_model_name}:{dormant}" + (":expert" if model_id.endswith(":expert") else "")
            return {**next(card for card in cards() if card["id"] == listed), "id": model_id}
        _, target = ctx.resolve_model(model_id)  # raises the 404
        routes = ctx.settings.model_routes
        for card in cards():  # a pair's bare name (vLLM's LoRA id) gets its card, under the id asked for
            if routes.get(card["id"]) == target:
                return {**card, "id": model_id}
        raise APIError(404, f"model {clip(model_id, 100)!r} does not exist", code=ErrorCode.MODEL_NOT_FOUND)

    @router.post("/tokenize")
    async def tokenize(raw: Annotated[dict[str, Any], Body()]) -> Any:
        # One path, two APIs: TGI's body is its GenerateRequest (``inputs``), answered and refused as TGI does;
        # vLLM's names ``prompt`` or ``messages``.
        if "inputs" in raw:
            return await tgi.tokenize(ctx, raw)
        body = validated(TokenizeRequest, raw)
        _, target = ctx.resolve_model(body.model)
        ctx.check_available()
        prompt = _convert(body.prompt_input)

        def render(prompt: PromptInput) -> list[int]:
            vocab = ctx.info.vocab_size
            if prompt.token_ids is not None and any(not 0 <= t < vocab for t in prompt.token_ids):
                raise FieldError(f"prompt token ids must be in [0, {vocab})", "prompt")
            return ctx.engine.tokenize(prompt, target)

        tokens = await ctx.rendered(prompt, render)
        answer = {"count": len(tokens), "max_model_len": ctx.info.max_model_len, "tokens": tokens}
        if body.return_token_strs:
            answer["token_strs"] = await asyncio.to_thread(ctx.engine.token_strings, tokens)
        return answer

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        ctx.resolve_model(body.model)
        ctx.check_available()
        if len(body.tokens) > ctx.info.max_model_len:
            raise bad_request(f"tokens holds {len(body.tokens)} ids, more than the context of "
                              f"{ctx.info.max_model_len} (max_model_len)", "tokens")
        body.check(ctx.info)
        return {"prompt": await asyncio.to_thread(_convert, lambda: ctx.engine.detokenize(body.tokens))}

    @router.get("/health")
    async def health() -> JSONResponse:
        if ctx.engine_failed:
            status = "failed"
        elif ctx.draining:
            status = "draining"
        elif ctx.load_error is not None:
            status = "failed"
        elif not ctx.engine.ready:
            status = "loading"
        else:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "5"})

    # vLLM's alias (SageMaker's and some load balancers' probe path), GET or POST: its own operation in the schema.
    @router.get("/ping")
    @router.post("/ping")
    async def ping() -> JSONResponse:
        return await health()

    @router.get("/version")
    async def get_version() -> dict[str, str]:
        return {"version": package_version()}

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return router

