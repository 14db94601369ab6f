"""Text Generation Inference's own API, for the clients written for TGI rather than for OpenAI.

``POST /generate``, ``POST /generate_stream``, ``POST /`` (TGI's compat route: either, by ``stream``; what
``huggingface_hub``'s ``InferenceClient(url).text_generation`` posts to), ``GET /info``, ``POST /tokenize`` with
TGI's body (routes.py tells it from vLLM's by ``inputs``) and ``POST /chat_tokenize``. Each request is the
proxy-tuned model's (``parameters.alpha`` sets the strength, as ``alpha`` does on the OpenAI endpoints;
``parameters.adapter_id`` may name another served model id, ``<name>:base`` or ``<name>:expert``, or a named
expert pair by its name or its expert's path or adapter, as TGI's LoRA adapters are named: that pair alone).

TGI's wire format (router/src/lib.rs, server.rs, validation.rs of TGI 3.x), what its clients parse:

- ``{"generated_text", "details"?}``; ``details`` only when asked (``details`` or ``decoder_input_details``):
  ``finish_reason`` (``length`` | ``eos_token`` | ``stop_sequence``), ``generated_tokens``, ``seed`` (null
  unless sampled), ``prefill`` (prompt tokens, with ``decoder_input_details``), ``tokens`` (each
  ``{id, text, logprob, special}``) and ``top_tokens`` (with ``top_n_tokens``). ``POST /`` answers a one-element
  list, as TGI does.
- A stream is one ``data:`` event per token, ``index`` counting from 1, ``generated_text`` and ``details``
  null until the last event, which carries the whole text (and ``details`` when asked); no ``[DONE]``.
- The stop string stays in ``generated_text``; ``return_full_text`` puts the prompt before it (the default on
  ``POST /``, as TGI's for a text-generation model); ``truncate`` keeps the prompt's last tokens.
- Sampling happens when ``do_sample`` is true or any of temperature, top_k, top_p, typical_p moves off its
  neutral value; otherwise decoding is greedy. ``parameters`` left out entirely means ``do_sample`` true.
- Errors are ``{"error", "error_type"}``: 422 ``validation`` for what the OpenAI endpoints answer with a 400,
  429 ``overloaded``, 424 ``generation`` for a failed generation; a stream that already started ends with
  an error event. Unlike TGI, a refused stream gets its status code rather than a 200 with one error event
  (TGI's clients read both).

Refused, since they would change the answer and are not done here: ``best_of`` above 1 and ``watermark``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import accumulate
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from proxy_engine.request import (
    MAX_STOP_STRINGS,
    ErrorCode,
    PromptInput,
    PromptTokens,
    RequestOutput,
    SamplingParams,
    Target,
    TokenLogprob,
)
from server.errors import APIError, ErrorResponse, describe_validation_errors, refused_as, shaped_route, validated
from server.protocol import ChatCompletionRequest, check_text, with_defaults
from server.serving import Choice, Generation, GenerationError, ServerContext, new_request_id
from server.streaming import EventStreamResponse, off_the_loop, sse
from server.structured import from_vllm

Start = Callable[..., Awaitable[tuple[Generation, list]]]
Collect = Callable[[Generation, Request], Awaitable[bool]]

PREFIX = "Input validation error: "  # TGI's, before every validation message
PATHS = ("/generate", "/generate_stream", "/", "/info", "/chat_tokenize")  # TGI's alone (/tokenize: by its body)
logger = logging.getLogger("proxy_serve")


# --- errors, in TGI's shape --------------------------------------------------------------------------------------
def tgi_error(status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> ErrorResponse:
    return ErrorResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def from_api_error(error: APIError) -> ErrorResponse:
    """An error the OpenAI endpoints would send, as TGI sends its kind: a refused request is a 422 validation
    error, an overload a 429, a failed generation a 424; other statuses keep theirs."""
    if error.status in (400, 404, 413):
        return tgi_error(422, PREFIX + error.message, "validation", error.headers)
    if error.status in (429, 503):
        return tgi_error(error.status, error.message, "overloaded", error.headers)
    if error.status in (500, 504):
        return tgi_error(424, f"Request failed during generation: {error.message}", "generation", error.headers)
    return tgi_error(error.status, error.message, "validation" if error.status < 500 else "generation",
                     error.headers)


def refusal(error: RequestValidationError | APIError) -> ErrorResponse:
    """A body that does not parse, or a refused request, in TGI's shape."""
    if isinstance(error, RequestValidationError):
        message, _ = describe_validation_errors(list(error.errors()))
        return tgi_error(422, PREFIX + message, "validation")
    return from_api_error(error)


TGIRoute = shaped_route(refusal)  # TGI's routes: their refusals in TGI's shape


def _invalid(message: str) -> APIError:
    return APIError(400, message)


# --- the request -------------------------------------------------------------------------------------------------
class Grammar(BaseModel):
    """TGI's ``grammar``: ``json`` (a schema, or a string holding one), ``json_schema`` (``{name?, schema}``) or
    ``regex``."""

    type: Literal["json", "json_object", "json_schema", "regex"]
    value: Any


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")  # as TGI: unknown keys are not read

    best_of: int | None = None
    decoder_input_details: bool | None = False
    details: bool | None = False
    do_sample: bool | None = False
    frequency_penalty: float | None = None
    grammar: Grammar | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)  # TGI's is a u64
    stop: list[str] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool | None = False
    adapter_id: str | None = None
    # Proxy-tuning: the strength of every expert pair (a number for all, or one per pair); 0 is the base alone.
    alpha: float | list[float] | None = None

    def sampled(self) -> bool:
        """TGI samples when asked to, or when any warper moves off its neutral value (its NextTokenChooser)."""
        moved = ((self.temperature is not None and self.temperature != 1.0) or bool(self.top_k)
                 or (self.top_p is not None and self.top_p < 1.0)
                 or (self.typical_p is not None and self.typical_p < 1.0))
        return bool(self.do_sample) or moved

    def check(self, stream: bool) -> None:
        """TGI's validation rules, where ours would accept what TGI refuses (its clients expect the refusal)
        or where a field asks for what this server does not do."""
        if self.best_of is not None and self.best_of > 1:
            raise _invalid("`best_of` > 1 is not supported: send one request per sequence")
        if stream and self.best_of == 0:
            raise _invalid("`best_of` != 1 is not supported when streaming tokens")
        if stream and self.decoder_input_details:
            raise _invalid("`decoder_input_details` == true is not supported when streaming tokens")
        if self.watermark:
            raise _invalid("`watermark` is not supported")
        for name in ("temperature", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise _invalid(f"`{name}` must be strictly positive")
        for name in ("top_p", "typical_p"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise _invalid(f"`{name}` must be > 0.0 and <= 1.0")
        if self.top_k is not None and self.top_k <= 0:
            raise _invalid("`top_k` must be strictly positive")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise _invalid("`max_new_tokens` must be strictly positive")
        if self.truncate is not None and self.truncate <= 0:
            raise _invalid("`truncate` must be strictly positive")
        if self.top_n_tokens is not None and self.top_n_tokens < 0:
            raise _invalid("`top_n_tokens` must be at least 0")
        if self.stop is not None and len(self.stop) > MAX_STOP_STRINGS:
            raise _invalid(f"`stop` supports up to {MAX_STOP_STRINGS} stop sequences. Given: {len(self.stop)}")

    def structured(self):
        """The grammar as the engine's output constraint (the OpenAI endpoints' rules and messages)."""
        if self.grammar is None:
            return None
        value = self.grammar.value
        if self.grammar.type == "json_schema":
            if not isinstance(value, dict) or "schema" not in value:
                raise _invalid("grammar.value must be an object with a 'schema' for type json_schema")
            value = value["schema"]
        key = "guided_regex" if self.grammar.type == "regex" else "guided_json"
        [(_, spec)] = from_vllm(None, {key: value})
        try:
            spec.validate()
        except ValueError as error:
            raise _invalid(f"grammar is not valid: {error}") from None
        return spec

    def logprobs(self, stream: bool) -> int | None:
        """The top k each token's entry needs: a stream's tokens always carry their logprob, as do details."""
        if stream or self.details or self.top_n_tokens:
            return self.top_n_tokens or 0
        return None

    def sampling_params(self, stream: bool, defaults: dict[str, Any]) -> SamplingParams:
        self.check(stream)
        sampled = self.sampled()
        values: dict[str, Any] = {
            "max_tokens": self.max_new_tokens,
            # None when sampled: the model's default temperature, else 1 (TGI's)
            "temperature": self.temperature if sampled else 0.0,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "typical_p": self.typical_p,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            # TGI's seed is a u64; the engine's a signed 64-bit one: the same bits.
            "seed": self.seed - 2**64 if self.seed is not None and self.seed >= 2**63 else self.seed,
            "stop": [check_text(text, "stop") for text in self.stop or []],
            "include_stop_str_in_output": True,  # TGI keeps the stop sequence in the text
            "alpha": self.alpha,
            "logprobs": self.logprobs(stream),
            "prompt_logprobs": (self.top_n_tokens or 0) if self.decoder_input_details else None,
            "structured": self.structured(),
        }
        # The model's generation_config fills the fields the request left out, as on the OpenAI endpoints (a
        # greedy request's temperature is set: it stays greedy).
        return with_defaults(values, defaults)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(min_length=1)
    # TGI: a request without ``parameters`` samples (its defaults), one with them is greedy unless they say so.
    parameters: GenerateParameters = Field(default_factory=lambda: GenerateParameters(do_sample=True))
    stream: bool | None = False
    # TGI's: the tokenizer's special tokens (BOS) on the inputs, as a plain-format model reads them.
    add_special_tokens: bool = True

    def prompt_input(self) -> PromptInput:
        """``truncate``: the models read the prompt's last tokens (as TGI's router cuts it)."""
        return PromptInput(text=check_text(self.inputs, "inputs"), truncate=self.parameters.truncate,
                           add_special_tokens=self.add_special_tokens)


# --- the answer --------------------------------------------------------------------------------------------------
def finish_reason(choice: Choice) -> str:
    """TGI's name for why the choice ended: a stop string (``stop_sequence``), its length, or an end token."""
    if choice.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(choice.stop_reason, str) else "eos_token"


def _logprob(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else -1e30  # JSON has no -inf


def _token(token_id: int, text: str, logprob: float | None, special: frozenset[int]) -> dict[str, Any]:
    return {"id": token_id, "text": text, "logprob": _logprob(logprob), "special": token_id in special}


class Answer:
    """One request's TGI answer, from its Generation (one choice)."""

    def __init__(self, generation: Generation, inputs: str, params: GenerateParameters, full_text: bool,
                 special: frozenset[int]) -> None:
        self.generation = generation
        self.prefix = inputs if full_text else ""
        self.params = params
        self.special = special
        self.seed = params.seed if params.sampled() else None

    @property
    def choice(self) -> Choice:
        return self.generation.choices[0]

    def tokens(self) -> list[dict[str, Any]]:
        return [_token(t.token_id, t.token, t.logprob, self.special) for t in self.choice.logprobs]

    def top_tokens(self) -> list[list[dict[str, Any]]]:
        return [self._tops(t) for t in self.choice.logprobs]

    def _tops(self, entry: TokenLogprob) -> list[dict[str, Any]]:
        """A token's alternatives (``top_n_tokens``), as TGI's tokens."""
        return [_token(top.token_id, top.token, top.logprob, self.special) for top in entry.top]

    def whole(self) -> dict[str, Any]:
        """``/generate``'s body."""
        body: dict[str, Any] = {"generated_text": self.prefix + self.choice.text}
        if self.params.details or self.params.decoder_input_details:
            prefill = [{"id": t.token_id, "text": t.token, "logprob": _logprob(t.logprob)}
                       for t in self.choice.prompt_logprobs or []]
            details: dict[str, Any] = {
                "finish_reason": finish_reason(self.choice), "generated_tokens": self.choice.completion_tokens,
                "seed": self.seed, "prefill": prefill, "tokens": self.tokens(),
            }
            if self.params.top_n_tokens:
                details["top_tokens"] = self.top_tokens()
            body["details"] = details
        return body

    def headers(self, started: float) -> dict[str, str]:
        """TGI's answer headers that clients read: token counts and timings."""
        elapsed = time.perf_counter() - started
        tokens = self.choice.completion_tokens
        return {
            "x-request-id": self.generation.request_id, "x-compute-type": "proxy-tuned",
            "x-prompt-tokens": str(self.generation.prompt_tokens), "x-generated-tokens": str(tokens),
            "x-compute-time": f"{elapsed:.6f}", "x-total-time": str(round(elapsed * 1000)),
            "x-time-per-token": str(round(elapsed * 1000 / tokens)) if tokens else "0",
        }

    async def events(self) -> AsyncIterator[str]:
        """``/generate_stream``'s events: one per token, the last with the whole text; a failure after the 200
        ends the stream with an error event."""
        index = 0
        pending = ""  # text of an output that brought no token (none in practice): sent with the next token
        try:
            async for output in self.generation.outputs():
                pending += output.text_delta
                for k, event in enumerate(self._token_events(output, pending)):
                    index += 1
                    pending = ""
                    last = output.finished and k == len(output.new_token_ids) - 1
                    yield sse({"index": index, **event, **self._end(last)})
        except Exception as error:  # noqa: BLE001 - headers are out: the failure is the stream's last event
            if not isinstance(error, GenerationError):
                logger.error("request %s failed while streaming", self.generation.request_id, exc_info=error)
                self.generation.error, self.generation.error_code = "internal error", ErrorCode.INTERNAL_ERROR
            kind = "overloaded" if self.generation.error_code == ErrorCode.SHUTDOWN else "generation"
            message = self.generation.error_body()["error"]["message"]  # names the request id
            yield sse({"error": f"Request failed during generation: {message}", "error_type": kind})

    def _token_events(self, output: RequestOutput, text: str) -> list[dict[str, Any]]:
        """One event body per new token; the step's text goes with its last token."""
        entries = output.logprobs or []
        events = []
        for k, token_id in enumerate(output.new_token_ids):
            entry = entries[k] if k < len(entries) else None
            piece = text if k == len(output.new_token_ids) - 1 else ""
            event: dict[str, Any] = {"token": _token(token_id, piece, entry.logprob if entry else None, self.special)}
            if self.params.top_n_tokens and entry is not None:
                event["top_tokens"] = self._tops(entry)
            events.append(event)
        return events

    def _end(self, last: bool) -> dict[str, Any]:
        if not last:
            return {"generated_text": None, "details": None}
        details = None
        if self.params.details:
            details = {"finish_reason": finish_reason(self.choice), "generated_tokens": self.choice.completion_tokens,
                       "seed": self.seed, "input_length": self.generation.prompt_tokens}
        return {"generated_text": self.prefix + self.choice.text, "details": details}


def simple_tokens(tokens: PromptTokens, truncate: int | None = None) -> list[dict[str, Any]]:
    """TGI's ``/tokenize`` answer: each token's ``id``, its ``text`` and where that lies in the UTF-8 input, as TGI
    counts it: byte offsets ``start``/``stop``; a token the tokenizer added (BOS) has ``""`` at 0-0. ``truncate``
    keeps the last tokens, as the prompt is cut for generation."""
    byte_at = list(accumulate((len(char.encode("utf-8", "surrogatepass")) for char in tokens.text), initial=0))
    listed = [{"id": token_id, "text": tokens.text[start:stop], "start": byte_at[start], "stop": byte_at[stop]}
              for token_id, (start, stop) in zip(tokens.ids, tokens.offsets, strict=True)]
    return listed[-truncate:] if truncate else listed


# --- the routes --------------------------------------------------------------------------------------------------
async def prompt_tokens(ctx: ServerContext, prompt: Callable[[], PromptInput], target: Target) -> PromptTokens:
    """A TGI request's prompt as the model it names reads it (``/tokenize``, ``/chat_tokenize``)."""
    ctx.check_available()
    try:
        prompt_input = prompt()
    except ValueError as error:  # PromptInput's own checks
        raise _invalid(str(error)) from None
    return await ctx.rendered(prompt_input, lambda rendered: ctx.engine.prompt_tokens(rendered, target))


async def tokenize(ctx: ServerContext, raw: dict[str, Any]) -> Response:
    """TGI's ``POST /tokenize``: its body is a ``GenerateRequest`` (``inputs`` tells it from vLLM's, on the same
    path); the tokens of the prompt that ``/generate`` would read (``add_special_tokens``, ``truncate``,
    ``adapter_id``)."""
    async def answer() -> Response:
        body = validated(GenerateRequest, raw)
        target = _target(ctx, _adapter_model(ctx, body.parameters.adapter_id))
        tokens = await prompt_tokens(ctx, body.prompt_input, target)
        return await off_the_loop(lambda: simple_tokens(tokens, body.parameters.truncate))

    return await refused_as(refusal, answer)


def _adapter_model(ctx: ServerContext, adapter_id: str | None) -> str | None:
    """TGI's picks one of its LoRA adapters; here a served model id, or a named pair (by name, or its expert's
    path or adapter): that pair alone."""
    return adapter_id and (ctx.settings.model_for_adapter(adapter_id) or adapter_id)


def _target(ctx: ServerContext, model: str | None) -> Target:
    try:
        return ctx.resolve_model(model)[1]
    except APIError as error:
        raise _not_served(ctx, model) if error.param == "model" else error from None


def _not_served(ctx: ServerContext, model: str) -> APIError:
    pairs = [pair.name for pair in ctx.settings.engine.experts if pair.name is not None]
    return _invalid(f"`adapter_id` {model[:100]!r} is not served here; use one of "
                    f"{', '.join(ctx.settings.model_ids + pairs)}, or none for the proxy-tuned model")


def add_tgi_routes(router: APIRouter, ctx: ServerContext, start: Start, collect: Collect, version: str
                   ) -> Callable[[dict[str, Any], Request], Awaitable[Response]]:
    """TGI's routes on ``router``; returns TGI's answer to a ``POST /`` body (SageMaker's /invocations sends it)."""
    tgi = APIRouter(route_class=TGIRoute)

    async def generate(body: GenerateRequest, request: Request, stream: bool, full_text: bool, listed: bool
                       ) -> Response:
        params = body.parameters
        model = _adapter_model(ctx, params.adapter_id)
        request_id = new_request_id("tgi", request.headers.get("x-request-id"))
        started = time.perf_counter()
        try:
            generation, _ = await start(request_id, "generate", model, body.prompt_input,
                                        lambda: params.sampling_params(stream, ctx.defaults_for(model)), request)
        except APIError as error:  # refused, and counted as such, by start
            raise _not_served(ctx, model) if error.param == "model" else error from None
        answer = Answer(generation, body.inputs, params, full_text, ctx.info.special_token_ids)
        if stream:
            headers = {"x-request-id": request_id, "x-compute-type": "proxy-tuned", "X-Accel-Buffering": "no"}
            return EventStreamResponse(answer.events(), generation.close, headers)
        if not await collect(generation, request):
            return Response(status_code=499)
        content = answer.whole()
        return JSONResponse([content] if listed else content, headers=answer.headers(started))

    @tgi.post("/generate")
    async def generate_whole(body: GenerateRequest, request: Request) -> Response:
        return await generate(body, request, False, bool(body.parameters.return_full_text), listed=False)

    @tgi.post("/generate_stream")
    async def generate_stream(body: GenerateRequest, request: Request) -> Response:
        return await generate(body, request, True, bool(body.parameters.return_full_text), listed=False)

    # TGI's compat route: what huggingface_hub's InferenceClient posts to. A text-generation model's default
    # there is the prompt followed by its continuation.
    @tgi.post("/")
    async def compat_generate(body: GenerateRequest, request: Request) -> Response:
        full = body.parameters.return_full_text
        return await generate(body, request, bool(body.stream), True if full is None else full, listed=True)

    @tgi.post("/chat_tokenize")
    async def chat_tokenize(body: ChatCompletionRequest) -> Response:
        """The chat as the model reads it: the chat template's text (``templated_text``) and its tokens."""
        tokens = await prompt_tokens(ctx, lambda: body.prompt_input(ctx.tool_call_format),
                                     ctx.resolve_model(body.model)[1])
        return await off_the_loop(lambda: {"tokenize_response": simple_tokens(tokens), "templated_text": tokens.text})

    @tgi.get("/info")
    async def info() -> dict[str, Any]:
        settings = ctx.settings
        max_len = ctx.info.max_model_len if ctx.engine.ready else None
        return {
            "model_id": settings.served_model_name, "model_sha": None, "model_pipeline_tag": "text-generation",
            "model_dtype": settings.engine.base.dtype, "model_device_type": settings.engine.base.device,
            "max_concurrent_requests": ctx.capacity if ctx.engine.ready else None,
            "max_best_of": 1, "max_stop_sequences": MAX_STOP_STRINGS,
            "max_input_tokens": max_len - 1 if max_len else None, "max_total_tokens": max_len,
            "validation_workers": 1, "max_client_batch_size": 1, "router": "proxy-serve",
            "version": version, "sha": None, "docker_label": None,
            # What a TGI client cannot know otherwise: the models behind the proxy-tuned one.
            "base": settings.engine.base.path,
            "experts": [{"expert": pair.expert.adapter or pair.expert.path, "anti_expert": pair.anti_expert.path,
                         "alpha": pair.alpha} for pair in settings.engine.experts],
        }

    router.include_router(tgi)

    async def invoke(raw: dict[str, Any], request: Request) -> Response:
        """``POST /``'s answer to a body read elsewhere, refused in TGI's shape."""
        return await refused_as(refusal, lambda: compat_generate(validated(GenerateRequest, raw), request))

    return invoke
