"""The server's side of one request: model id to target, admission, engine outputs to per-choice state.

``ServerContext`` is what every route needs (engine, settings, metrics, draining flag); it lives on the app
built by ``create_app`` and is never global. ``Generation`` wraps one engine ``RequestStream``: it keeps
each choice's text, logprobs and finish reason, feeds the latency metrics, and on ``close`` aborts the
engine request if it did not finish (client gone, error) and writes the request's single log line.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from proxy_engine import PromptInput, SamplingParams  # the package's public request types
from proxy_engine.async_engine import AsyncEngine, EngineStats, ModelInfo, RequestStream
from proxy_engine.beam_search import add_beam_search_request
from proxy_engine.config import LimitsConfig
from proxy_engine.grammar import GrammarBusyError
from proxy_engine.request import (
    MAX_N,
    EngineOverloadedError,
    ErrorCode,
    FinishReason,
    PairNotFoundError,
    RequestOutput,
    RequestTimings,
    Serves,
    Target,
    TokenAnalysis,
    TokenLogprob,
)
from proxy_engine.sampling_defaults import SamplingDefaults, describe, sampling_defaults
from proxy_engine.scheduler import has_room, with_running_cap
from server.errors import APIError, bad_request, error_body, internal_error
from server.guards import clip
from server.metrics import RequestTimer, ServerMetrics
from server.protocol import usage
from server.reasoning import ReasoningParser, reasoning_end
from server.settings import ServerSettings

logger = logging.getLogger("proxy_serve")
request_logger = logging.getLogger("proxy_serve.requests")

# How often a request waiting for its next output checks that the engine is still alive.
ENGINE_CHECK_S = 1.0

T = TypeVar("T")


class GenerationError(Exception):
    """A request ended in error after it was accepted: the engine failed it, timed it out, or the server shut
    down before it finished. ``code`` is one of ``ERRORS``."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INTERNAL_ERROR) -> None:
        super().__init__(message)
        self.code = code


# How each way of failing after admission reaches the client: HTTP status (when nothing was sent yet), and
# the error's OpenAI type and code (in the body, or in the stream's error event).
ERRORS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INTERNAL_ERROR: (500, "server_error"),  # a fault in the engine step (or a bug): the others keep going
    ErrorCode.TIMEOUT: (504, "timeout"),  # limits.request_timeout_s ran out
    ErrorCode.SHUTDOWN: (503, "service_unavailable"),  # SIGTERM's grace period ran out first: retry elsewhere
    ErrorCode.NO_TOKEN_ALLOWED: (400, "invalid_request_error"),  # the request's constraints exclude every token
}


def openai_finish_reason(reason: FinishReason) -> str:
    """``abort`` never reaches a client that is still there (the server aborts only departed or failed
    requests); should one slip through, it is reported as a limit, like ``length``."""
    return FinishReason.LENGTH.value if reason is FinishReason.ABORT else reason.value


@dataclass(eq=False)
class ServerContext:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: ServerMetrics = field(init=False)
    defaults: dict[Target, SamplingDefaults] = field(init=False)  # per target: engine.generation_config's
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    # Set when the shutdown grace period runs out: every request still open ends with a "shutdown" error.
    expired: bool = False
    load_error: str | None = None
    in_flight: int = 0  # accepted requests not yet closed (what a drain waits for)
    # Sequences of requests admitted by the server but still being rendered and tokenized (not yet in the
    # engine's queue): counted against the queue, so that a burst is refused before it is tokenized.
    reserved: int = 0

    def __post_init__(self) -> None:
        settings = self.settings
        adapters = settings.allow_runtime_lora_updating or settings.lora_resolver_dir is not None \
            or any(p.name for p in settings.engine.experts)
        self.metrics = ServerMetrics(self.stats, settings.served_model_name, adapters, self._cache_config)
        self.defaults = sampling_defaults(self.settings.engine)
        names = {target: model_id for model_id, target in self.settings.model_routes.items()}
        for line in describe(self.defaults, names):
            logger.info("sampling defaults for requests that omit them: %s", line)

    @property
    def max_logprobs(self) -> int:
        """The most alternatives per token a request may ask for (-1: the whole vocabulary)."""
        return self.settings.engine.limits.max_logprobs

    def defaults_for(self, model: str | None) -> dict[str, Any]:
        """The sampling fields ``model``'s requests get when they omit them (``engine.generation_config``)."""
        target = self.resolve_model(model)[1]
        if target not in self.defaults:  # a pair added while serving (lora_adapters.py), routable before this saw it
            self.defaults = sampling_defaults(self.settings.engine)
        return self.defaults.get(target, SamplingDefaults()).values

    @property
    def ready(self) -> bool:
        return bool(self.engine.ready) and not self.draining and self.load_error is None

    @property
    def engine_failed(self) -> bool:
        """The engine's step thread died: nothing can be served any more (the process exits non-zero)."""
        return getattr(self.engine, "fatal_error", None) is not None

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    @property
    def tool_call_format(self) -> str | None:
        """The family's tool-call format, None if it has none (known once the models are loaded; until then
        requests are refused anyway)."""
        info = self.engine.info
        return info.tool_call_format if info is not None else "hermes"

    def stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine.ready else None

    def _cache_config(self) -> tuple[dict[str, str], int]:
        """vLLM's cache_config_info labels as this server has them, and the loaded max_model_len (ServerMetrics;
        once loaded); no gpu_memory_utilization where none is set (the CPU's default)."""
        engine = self.settings.engine
        utilization = engine.runtime.gpu_memory_utilization
        labels = {"block_size": str(engine.prefix_cache.block_size), "cache_dtype": "auto",
                  "enable_prefix_caching": str(engine.prefix_cache.enabled),
                  **({} if utilization is None else {"gpu_memory_utilization": str(utilization)})}
        return labels, self.info.max_model_len

    def drain(self) -> None:
        """Stop taking new requests (SIGTERM): ``/health`` says draining, new requests get 503."""
        if not self.draining:
            self.draining = True
            logger.info("draining: new requests are refused, running ones finish")
            if self.engine.ready:
                self.engine.stop_admitting()

    def expire(self) -> None:
        """The grace period is over: requests still open end now with a ``shutdown`` error (503 / error event),
        each noticing within ``ENGINE_CHECK_S``; their engine rows are aborted as they close."""
        self.drain()
        if not self.expired:
            self.expired = True
            logger.warning("shutdown grace period over: ending %d open request(s)", self.in_flight)

    def resolve_model(self, model: str | None) -> tuple[str, Target]:
        """The request's ``model`` to (served id, engine target); a missing model means the proxy-tuned one."""
        routes = self.settings.model_routes
        if model is None or model == "":
            return self.settings.served_model_name, Target.PROXY
        model = self.settings.canonical_model(model)  # an alias is answered under the id, as vLLM's first name
        if model in routes:
            return model, routes[model]
        pair = self.settings.pair_named(model)
        if pair is not None:  # a pair's bare name, as vLLM serves a LoRA module: the base steered by it
            return model, Target(Serves.PROXY, pair)
        known = ", ".join(routes)
        raise APIError(404, f"model {clip(model, 100)!r} does not exist; this server serves: {known}", param="model",
                       code=ErrorCode.MODEL_NOT_FOUND)

    def queue_full(self, sequences: int) -> bool:
        """Whether the engine would refuse ``sequences`` more right now, by its own rule (free batch slots plus
        ``max_waiting``). Checked before the prompt is rendered, so that a burst of refusals costs the event
        loop next to nothing (a 4 MB prompt is not tokenized just to be refused); the engine's check at
        ``add`` stays the authority."""
        stats = self.stats()
        if stats is None:
            return False
        return not has_room(self.limits(stats), sequences, stats.waiting + self.reserved,
                            stats.running + stats.prefilling)

    def limits(self, stats: EngineStats | None) -> LimitsConfig:
        """The engine's limits as it applies them: the config's, with the running batch capped where the
        engine's static K/V buffers hold fewer than ``max_num_seqs`` rows (it says so in its stats)."""
        return with_running_cap(self.settings.engine.limits, stats.max_num_seqs if stats is not None else 0)

    @property
    def capacity(self) -> int:
        """Sequences the engine can hold at once: a request asking for more can never be admitted."""
        limits = self.limits(self.stats())
        return limits.max_num_seqs + limits.max_waiting

    def check_size(self, prompts: list[PromptInput], params: SamplingParams) -> None:
        """400 for a request that no wait would let in, or whose prompts are too long to be worth tokenizing."""
        n = params.n if 1 <= params.n <= MAX_N else 1  # a bad n is the engine's 400
        sequences = len(prompts) * n
        if sequences > self.capacity:
            raise APIError(
                400, f"the request needs {sequences} sequences ({len(prompts)} prompt(s) x n={n}) but this server "
                f"holds at most {self.capacity} at once (max_num_seqs + max_waiting): send fewer prompts or a "
                "smaller n", param="n" if n > 1 else "prompt", code=ErrorCode.REQUEST_TOO_LARGE)
        total = 0
        for i, prompt in enumerate(prompts):
            chars = prompt_chars(prompt)
            total += chars
            if chars > self.settings.max_prompt_chars:
                where = "messages" if prompt.messages is not None else ("prompt" if len(prompts) == 1 else
                                                                        f"prompt[{i}]")
                param = where.split("[")[0]
                if prompt.tools or prompt.template_kwargs:  # the largest part is named: a tools bomb is about tools
                    extra = {"tools": tools_chars(prompt),
                             "chat_template_kwargs": _json_chars(prompt.template_kwargs or {})}
                    parts = {"messages": chars - sum(extra.values()), **extra}
                    where = " and ".join(name for name, count in parts.items() if count)
                    param = max(parts, key=parts.__getitem__)
                raise APIError(400, f"{where} hold{'' if ' and ' in where else 's'} {chars} characters, "
                               f"more than the limit of {self.settings.max_prompt_chars} (max_prompt_chars)",
                               param=param, code=ErrorCode.PROMPT_TOO_LONG)
        if total > self.settings.max_request_chars:
            raise APIError(400, f"the request's prompts hold {total} characters, more than the limit of "
                           f"{self.settings.max_request_chars} (max_request_chars)", param="prompt",
                           code=ErrorCode.PROMPT_TOO_LONG)

    async def rendered(self, prompt: PromptInput, render: Callable[[PromptInput], T]) -> T:
        """``render(prompt)`` (the engine's ids, or its tokens with their offsets) for a route that only tokenizes:
        the prompt within the size limits, the work off the event loop (a long prompt takes seconds, and every
        stream and /health would wait), a ValueError from it a 400."""
        self.check_size([prompt], SamplingParams())
        try:
            return await asyncio.to_thread(render, prompt)
        except ValueError as error:  # a prompt the engine cannot render (a FieldError names its field)
            raise bad_request(str(error), getattr(error, "param", None)) from None

    def overloaded(self, message: str, retry_after_s: int | None) -> APIError:
        retry = str(max(1, int(retry_after_s or 1)))
        if self.draining:
            return APIError(503, "the server is shutting down", code=ErrorCode.DRAINING, headers={"Retry-After": retry})
        return APIError(429, f"the server is overloaded: {message}", code=ErrorCode.SERVER_OVERLOADED,
                        headers={"Retry-After": retry})

    def check_available(self) -> None:
        if self.engine_failed:
            raise APIError(503, "the engine has failed and the server is restarting", code=ErrorCode.ENGINE_FAILED)
        if self.draining:
            raise APIError(503, "the server is shutting down", code=ErrorCode.DRAINING, headers={"Retry-After": "5"})
        if self.load_error is not None:
            raise APIError(503, "the models failed to load", code=ErrorCode.LOAD_FAILED)
        if not self.engine.ready:
            raise APIError(503, "the models are still loading", code=ErrorCode.LOADING, headers={"Retry-After": "5"})

    def cache_salt(self, tenant: str | None, salt: str | None) -> str | None:
        """A request's prefix-cache salt: its key's tenant id (``cache_salt_per_key``) and its own ``cache_salt``.
        Prompts with different salts share no cached block (docs/security.md)."""
        parts = []
        if tenant is not None and self.settings.cache_salt_per_key:
            parts.append(f"key:{tenant}")
        if salt is not None:
            parts.append(f"salt:{salt}")
        return "\n".join(parts) or None

    async def submit(
        self, request_id: str, prompt: PromptInput | list[PromptInput], params: SamplingParams, target: Target,
        salt: str | None = None,
    ) -> RequestStream:
        """Hand a request to the engine (one prompt or several), turning its refusals into HTTP errors."""
        self.check_available()
        prompts = prompt if isinstance(prompt, list) else [prompt]
        self.check_size(prompts, params)
        if salt is not None:
            prompts = [dataclasses.replace(one, cache_salt=salt) for one in prompts]
            prompt = prompts if isinstance(prompt, list) else prompts[0]
        sequences = len(prompts) * (params.n if 1 <= params.n <= MAX_N else 1)
        if self.queue_full(sequences):
            raise self.overloaded(f"the waiting queue is full ({self.settings.engine.limits.max_waiting} "
                                  "sequences); retry shortly", 1)
        self.reserved += sequences  # released once the engine has queued them (or refused)
        add = add_beam_search_request if params.beam_search else _add_request
        try:
            return await add(self.engine, request_id, prompt, params, target,
                             max_logprob_entries=self.settings.max_logprob_entries)
        except ValueError as error:  # a ContextLengthError names its field and code
            raise APIError(400, str(error), param=getattr(error, "param", None),
                           code=getattr(error, "code", None)) from None
        except (EngineOverloadedError, GrammarBusyError) as error:
            raise self.overloaded(str(error), getattr(error, "retry_after_s", 1)) from None
        except PairNotFoundError as error:  # the adapter was unloaded while the request was rendered
            raise APIError(404, str(error), param="model", code=ErrorCode.MODEL_NOT_FOUND) from None
        except Exception:
            logger.exception("engine refused request %s with an internal error", request_id)
            raise internal_error(request_id) from None
        finally:
            self.reserved -= sequences


async def _add_request(engine, *args, **kwargs) -> RequestStream:
    return await engine.add_request(*args, **kwargs)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def log_clip(prompt: Any, limit: int | None) -> Any:
    """A prompt as a log line shows it under ``--max-log-len`` (vLLM's): each text cut to ``limit`` characters and
    each list of token ids to ``limit`` ids (a chat's messages, several prompts: each one's); None: all of it."""
    if limit is None:
        return prompt
    if isinstance(prompt, str):
        return clip(prompt, limit) if len(prompt) > limit else prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return prompt if len(prompt) <= limit else [*prompt[:limit], f"... ({len(prompt)} ids)"]
    if isinstance(prompt, list):
        return [log_clip(item, limit) for item in prompt]
    if isinstance(prompt, dict):
        return {key: log_clip(value, limit) for key, value in prompt.items()}
    return prompt


def prompt_chars(prompt: PromptInput) -> int:
    """Characters a prompt gives the tokenizer (token ids count one each): every message's text, name and
    earlier tool calls, and the tools' definitions, which are rendered into the prompt too (a 3.8 MB tool
    description was rendered and tokenized for every model before the prompt's size was ever checked)."""
    if prompt.text is not None:
        return len(prompt.text)
    if prompt.messages is not None:
        chars = sum(len(m.get("content") or "") + len(m.get("name") or "") + len(m.get("tool_call_id") or "")
                    + sum(_json_chars(call) for call in m.get("tool_calls") or []) for m in prompt.messages)
        return chars + tools_chars(prompt) + _json_chars(prompt.template_kwargs or {})
    return len(prompt.token_ids or [])


def request_shape(body: Any) -> str:
    """A request body's shape for the debug log, without its content: the keys it sent (the ignored ones too),
    how many messages / input items / prompts / tools, and its tool_choice, e.g.
    ``keys=messages,model,stream,tools messages=1 tools=36 tool_choice=-``."""
    if not isinstance(body, dict):
        return f"body={type(body).__name__}"
    parts = [f"keys={','.join(sorted(clip(str(k), 40) for k in body)[:64])}"]
    for key in ("messages", "input", "prompt", "tools"):
        value = body.get(key)
        if isinstance(value, list):
            parts.append(f"{key}={len(value)}")
        elif isinstance(value, str) and key != "tools":
            parts.append(f"{key}=1")
    if "tools" in body:
        choice = body.get("tool_choice")
        parts.append(f"tool_choice={clip(choice, 20) if isinstance(choice, str) else 'function' if choice else '-'}")
    return " ".join(parts)


def tools_chars(prompt: PromptInput) -> int:
    return sum(_json_chars(tool) for tool in prompt.tools or [])


def _json_chars(value: Any) -> int:
    """The characters a JSON value carries (its strings and keys, scalars as written, two per container), by a
    walk that never copies: serializing a 3.8 MB tool description only to measure it took 40-90 ms of the event
    loop per request, twice its parsing."""
    chars, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, dict):
            chars += 2 + sum(len(str(key)) for key in item)
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            chars += 2
            stack.extend(item)
        else:
            chars += len(str(item))
    return chars


# A client's (or its gateway's) X-Request-Id worth keeping: what UUIDs, Envoy's and cloud load balancers' ids are
# made of, nothing that could break a log line or a header.
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/=+-]{1,128}")


def new_request_id(prefix: str, client_id: str | None = None) -> str:
    """A fresh id; a client's ``X-Request-Id`` (``client_id``) is kept in it, so that the client's logs and ours
    meet (``chatcmpl-<theirs>-<8 hex>``). Never the header alone: ids are unique in the engine, and a repeated
    header must not let one request's abort reach another's."""
    if client_id is not None and CLIENT_REQUEST_ID.fullmatch(client_id):
        return f"{prefix}-{client_id}-{uuid.uuid4().hex[:8]}"
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Choice:
    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # echo with logprobs
    model_logprobs: list[TokenAnalysis] = field(default_factory=list)  # every model's view of each token
    token_ids: list[int] = field(default_factory=list)  # what it generated (vLLM's return_token_ids)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop token id that ended it (None: EOS)
    completion_tokens: int = 0
    cached_tokens: int = 0  # its prompt's tokens read from the prefix cache (on a prompt's first choice)
    # Per output that brought tokens: the text offset where its text began, and the tokens up to and including
    # it: how the tokens of a reasoning model's thinking are told from its answer's.
    starts: list[int] = field(default_factory=list)
    tokens_through: list[int] = field(default_factory=list)
    thinking_tokens: int | None = None  # set once the thinking has closed and the answer begun: it stays so
    timings: RequestTimings | None = None  # the engine's, once it finished: queue, prefill and decode time

    def mark(self, tokens: int) -> None:
        """An output of ``tokens`` tokens whose text is about to be appended."""
        self.starts.append(len(self.text))
        self.tokens_through.append((self.tokens_through[-1] if self.tokens_through else 0) + tokens)

    def tokens_before(self, offset: int) -> int:
        """Tokens whose text began before ``offset`` (the token that closes a span counts in it); a bisection,
        since a stream's usage chunks may ask at every token."""
        outputs = bisect.bisect_left(self.starts, offset)
        return self.tokens_through[outputs - 1] if outputs else 0

    def reasoning_tokens(self, parser: ReasoningParser | None) -> int:
        """The tokens ``parser`` reads as this choice's thinking (the token that closes it counts in it); kept
        once the thinking has closed, so that a stream asking at every token does not split the text each time."""
        if self.thinking_tokens is not None:
            return self.thinking_tokens
        end = reasoning_end(parser, self.text)
        tokens = self.tokens_before(end)
        if 0 < end < len(self.text):
            self.thinking_tokens = tokens
        return tokens


class Generation:
    """One accepted request in flight: iterate ``outputs()``, then always ``close()``."""

    def __init__(
        self,
        ctx: ServerContext,
        stream: RequestStream,
        *,
        request_id: str,
        endpoint: str,
        model: str,
        n: int,
        timer: RequestTimer,
        prompt_log: Any = None,
        params: SamplingParams | None = None,
    ) -> None:
        self.ctx = ctx
        self.params = params  # what the request asked for (vLLM's request_params_* histograms)
        self.stream = stream
        self.request_id = request_id
        self.endpoint = endpoint
        self.model = model
        self.timer = timer
        self.prompt_log = prompt_log
        self.choices = [Choice(i) for i in range(n)]
        self.finished = False
        self.error: str | None = None
        self.error_code: ErrorCode | None = None  # a key of ERRORS, once self.error is set
        self._closed = False
        ctx.in_flight += 1

    @property
    def prompt_tokens(self) -> int:
        return self.stream.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    @property
    def cached_tokens(self) -> int:
        return sum(c.cached_tokens for c in self.choices)

    def usage(self, parser: ReasoningParser | None = None, reasoning: bool = False) -> dict[str, Any]:
        """The usage object so far; ``reasoning`` (chat) adds the tokens ``parser`` reads as thinking."""
        thinking = None
        if reasoning:
            thinking = sum(c.reasoning_tokens(parser) for c in self.choices)
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens, thinking)

    def prompt_ids(self, index: int) -> list[int] | None:
        """Choice ``index``'s prompt ids (the base model's), when the request asked for them."""
        ids = self.stream.prompt_ids
        if ids is None:
            return None
        return ids[index // (len(self.choices) // len(ids))]  # choice k answers prompt k // n

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The engine's outputs after bookkeeping; raises ``GenerationError`` on an engine error."""
        async for output in self._engine_outputs():
            choice = self.choices[output.index]
            counted = len(output.new_token_ids)
            self.timer.tokens(output.index, counted)
            if counted:
                choice.mark(counted)
            choice.text += output.text_delta
            if output.cached_tokens is not None:
                choice.cached_tokens = output.cached_tokens
            choice.token_ids.extend(output.new_token_ids)
            choice.completion_tokens = output.completion_tokens or choice.completion_tokens + counted
            if output.logprobs:
                choice.logprobs.extend(output.logprobs)
            if output.model_logprobs:
                choice.model_logprobs.extend(output.model_logprobs)
            if output.prompt_logprobs is not None:
                choice.prompt_logprobs = output.prompt_logprobs
            if output.finish_reason is FinishReason.ERROR:
                code = output.error_code if output.error_code in ERRORS else ErrorCode.INTERNAL_ERROR
                # The engine logged a fault's traceback once; this is the request's own line.
                log = logger.warning if code == ErrorCode.TIMEOUT else logger.error
                log("request %s failed (%s): %s", self.request_id, code, output.error or "unknown engine error")
                self._fail(output.error or "unknown engine error", code)
            if output.finish_reason is not None:
                choice.finish_reason = openai_finish_reason(output.finish_reason)
                choice.stop_reason = output.stop_reason
                choice.timings = output.timings
            yield output
        self.finished = True

    def _fail(self, message: str, code: ErrorCode) -> None:
        self.error, self.error_code = message, code
        raise GenerationError(message, code)

    def _check_alive(self) -> None:
        if self.ctx.expired:
            self._fail("the server shut down before the request finished; retry it", ErrorCode.SHUTDOWN)
        if not self.ctx.engine.ready:
            logger.error("request %s: the engine stopped unexpectedly", self.request_id)
            self._fail("the engine stopped unexpectedly", ErrorCode.INTERNAL_ERROR)

    async def _engine_outputs(self) -> AsyncIterator[RequestOutput]:
        """The stream's outputs, but never a silent stall: if the engine's step loop dies (``ready`` turns
        False) or the shutdown grace period ends while this request waits, the request fails instead of
        waiting forever."""
        iterator = aiter(self.stream)
        while True:
            pending = asyncio.ensure_future(anext(iterator))
            # If this generator is closed (the client left) just as the stream ends, nobody reads the
            # task's StopAsyncIteration: mark it read, or asyncio logs "Task exception was never retrieved".
            pending.add_done_callback(_retrieve)
            try:
                while not (await asyncio.wait({pending}, timeout=ENGINE_CHECK_S))[0]:
                    self._check_alive()
            finally:
                if not pending.done():
                    pending.cancel()
            try:
                output = pending.result()
            except StopAsyncIteration:
                return
            if self.ctx.expired:
                self._check_alive()
            yield output

    def error_body(self) -> dict[str, Any]:
        """The OpenAI error for this failed request, naming its id (sent as a stream's error event)."""
        code = self.error_code or ErrorCode.INTERNAL_ERROR
        _, kind = ERRORS[code]
        message = f"{self.error or 'internal error'} (request id {self.request_id})"
        return error_body(message, type=kind, code=code)

    def api_error(self) -> APIError:
        """The same error as an HTTP response, for a request that had sent nothing yet."""
        code = self.error_code or ErrorCode.INTERNAL_ERROR
        status, kind = ERRORS[code]
        headers = {"x-request-id": self.request_id}
        if code == ErrorCode.SHUTDOWN:
            headers["Retry-After"] = "5"
        message = f"{self.error or 'internal error'} (request id {self.request_id})"
        return APIError(status, message, type=kind, code=code, headers=headers)

    async def run_to_end(self) -> None:
        async for _ in self.outputs():
            pass

    def close(self, status: int | str | None = None) -> None:
        """Abort the engine request unless it finished; count it and write its log line (once)."""
        if self._closed:
            return
        self._closed = True
        self.ctx.in_flight -= 1
        if not self.finished:
            self.ctx.engine.abort(self.request_id)
        if status is None:
            failed = "error" if self.error_code in (None, ErrorCode.INTERNAL_ERROR) else self.error_code
            status = 200 if self.finished else (failed if self.error else "disconnected")
        elapsed = self.timer.finish(observe=self.finished)
        self.ctx.metrics.requests.labels(self.endpoint, self.model, str(status)).inc()
        if self.finished and self.choices:
            self.ctx.metrics.request_finished(self.choices[0].finish_reason or "stop", self.prompt_tokens,
                                              self.completion_tokens,
                                              max(c.completion_tokens for c in self.choices), self.params)
            for choice in self.choices:
                if choice.timings is not None:
                    self.ctx.metrics.choice_timed(choice.timings, choice.completion_tokens)
        if status == 200 and not self.ctx.settings.log_requests:
            return  # --disable-log-requests: a request that failed or was cut off is still written
        reasons = ",".join(c.finish_reason or "-" for c in self.choices)
        prompt = f" prompt={log_clip(self.prompt_log, self.ctx.settings.max_log_len)!r}" \
            if self.ctx.settings.log_prompts else ""
        request_logger.info(
            "%s model=%s status=%s prompt_tokens=%d completion_tokens=%d finish=%s time=%.3fs%s",
            self.request_id, self.model, status, self.prompt_tokens, self.completion_tokens, reasons, elapsed, prompt,
        )
