"""The asyncio face of the engine: submit a request, iterate its outputs, abort it.

The model work runs in one background thread (the step loop); outputs cross back to the event loop once per
step, routed to a per-request ``asyncio.Queue``. This is the only module the server talks to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from proxy_engine.config import EngineConfig, ExpertPairConfig
from proxy_engine.grammar import CONSTRAINED_RENDER_THREADS
from proxy_engine.request import (
    EngineOverloadedError,
    FieldError,
    PromptInput,
    PromptTokens,
    RequestOutput,
    SamplingParams,
    Target,
)
from proxy_engine.step_tokens import StepTokenCounts

log = logging.getLogger("proxy_engine")


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about the loaded models (no tensors)."""

    base_path: str
    expert_paths: list[str]
    max_model_len: int  # the smallest of the models' limits (and the configured cap)
    vocab_size: int
    default_alphas: list[float]
    eos_token_ids: list[int]
    # How this family writes tool calls (proxy_engine/tool_calls.py); None: it does not (no template renders tools).
    tool_call_format: str | None = "hermes"
    # The primary tokenizer's special tokens (TGI's ``special`` flag on each generated token).
    special_token_ids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def of(cls, engine, config: EngineConfig) -> ModelInfo:
        """What the server is told about a built ``ProxyEngine``."""
        return cls(
            base_path=config.base.path,
            expert_paths=[pair.expert.path for pair in config.experts],
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            default_alphas=config.default_alphas,
            eos_token_ids=sorted(engine.eos_ids),
            tool_call_format=engine.tool_call_format,
            special_token_ids=frozenset(engine.tokenizer.all_special_ids) | engine.eos_ids,
        )


@dataclass(frozen=True, kw_only=True)
class PrefixCacheStats:
    """One model's prefix cache, in prompt tokens (as vLLM's ``prefix_cache_queries`` / ``prefix_cache_hits``)."""

    model: str  # the model's role: base, expert, anti_expert (expert_1, ... for further pairs)
    queries_total: int = 0  # prompt tokens looked up
    hits_total: int = 0  # of those, tokens taken from the cache (not computed)
    usage: float = 0.0  # bytes held over the cache's budget, 0-1


@dataclass(frozen=True)
class KVBudgetStats:
    """One device's K/V budget (kv_budget.py): what its growable caches hold, and the most they may."""

    device: str
    used_bytes: int
    limit_bytes: int


@dataclass(frozen=True, kw_only=True)
class EngineStats:
    running: int = 0  # sequences in the decode batch
    waiting: int = 0  # sequences queued, not yet prefilling
    prefilling: int = 0  # sequences whose prompts are being prefilled
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    preemptions_total: int = 0  # running sequences sent back to the queue (more urgent ones, out of memory)
    kv_cache_usage: float = 0.0  # how full the K/V is, 0-1 (ProxyEngine.kv_cache_usage)
    prefix_caches: tuple[PrefixCacheStats, ...] = ()  # the models with a prefix cache
    kv_budgets: tuple[KVBudgetStats, ...] = ()  # the devices with a K/V budget
    max_num_seqs: int = 0  # the running batch's cap: the config's, or fewer where static K/V holds fewer; 0 unknown
    # The named pairs (LoRA adapters served by name) that running / queued sequences were asked of, by name.
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    step_tokens: StepTokenCounts = StepTokenCounts()  # tokens per engine step (vLLM's iteration_tokens_total)


class RequestStream:
    """Async iterator over one request's ``RequestOutput`` deltas (all choices interleaved, by ``index``).

    Iteration ends after every choice has finished. ``prompt_tokens`` is known as soon as the request is
    accepted, and so are ``prompt_ids`` (each prompt's ids, the base model's) when ``return_prompt_ids`` asked
    for them. Leaving the iteration early does not abort: call ``AsyncEngine.abort`` (the server does so
    when the client disconnects).
    """

    def __init__(self, request_id: str, n: int, prompt_tokens: int,
                 prompt_ids: list[list[int]] | None = None) -> None:
        self.request_id = request_id
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.prompt_ids = prompt_ids
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.open_choices = set(range(n))  # kept by the engine's dispatcher
        self._unfinished = n

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while self._unfinished > 0:
            output = await self.queue.get()
            if output.finished:
                self._unfinished -= 1
            yield output


def constrained_render_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads that render requests with an output constraint: they wait there for the grammar compiler (its
    own thread, ``GrammarCompiler``), so grammar bombs never hold the threads that admit plain requests."""
    return concurrent.futures.ThreadPoolExecutor(CONSTRAINED_RENDER_THREADS,
                                                 thread_name_prefix="proxy-engine-constrained")


def make_request_sequences(engine, request_id: str, prompts: list[PromptInput], params: SamplingParams,
                           target: Target) -> list:
    """Every choice of every prompt as the engine's sequences: prompt ``i``'s ``n`` choices numbered from ``i * n``."""
    sequences = []
    for i, one in enumerate(prompts):
        sequences += engine.make_sequences(request_id, one, params, target, first_index=i * params.n)
    return sequences


# What the caller learns when a request is admitted: its prompt tokens (usage), and each prompt's ids when asked.
Admitted = tuple[int, list[list[int]] | None]


def admitted(sequences: list, params: SamplingParams) -> Admitted:
    """``(prompt tokens, prompt ids)`` of a request's sequences: the first choice of each prompt counts, in the
    model that reports usage (the base); the ids only under ``return_prompt_ids``."""
    firsts = [s for s in sequences if s.index % params.n == 0]
    ids = [list(s.prompts[s.runners[0]]) for s in firsts] if params.return_prompt_ids else None
    return sum(s.primary_prompt_len for s in firsts), ids


def check_logprob_entries(sequences: list, params: SamplingParams, limit: int | None) -> None:
    """Refuse (``ValueError``) an answer holding more than ``limit`` logprob entries: with prompt logprobs, one
    per prompt token per choice, each with its top k; with ``model_logprobs``, one per model and one for the
    proxy at each token the choice may generate, each with its top k."""
    if limit is None:
        return
    k = params.prompt_logprobs
    if k is not None:
        entries = sum(s.primary_prompt_len for s in sequences) * (1 + k)
        if entries > limit:
            raise ValueError(
                f"the answer would hold {entries} prompt logprob entries (prompt tokens x choices x (1 + logprobs "
                f"{k})), more than the limit of {limit} (max_logprob_entries): send fewer prompts, a smaller n or "
                "fewer logprobs"
            )
    k = params.model_logprobs
    if k is not None:
        entries = sum(s.max_tokens * (len(s.prompts) + 1) for s in sequences) * (1 + k)
        if entries > limit:
            raise FieldError(
                f"the answer could hold {entries} model logprob entries (tokens x choices x (models + proxy) x "
                f"(1 + model_logprobs {k})), more than the limit of {limit} (max_logprob_entries): send a smaller "
                "max_tokens, a smaller n or a smaller model_logprobs", "model_logprobs"
            )


async def _in_daemon_thread(function, name: str):
    """``await function()`` run in a new daemon thread (which the interpreter does not wait for at exit)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(setter, value) -> None:
        if not future.done():  # the awaiting task may have been cancelled
            setter(value)

    def run() -> None:
        try:
            outcome = (future.set_result, function())
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
            outcome = (future.set_exception, error)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: nobody waits for the result any more
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


def engine_counts(engine) -> dict[str, int]:
    """The ``EngineStats`` fields that are plain counts: each a single read, safe from any thread."""
    return {
        "running": len(engine.running),
        "waiting": engine.num_waiting,
        "prefilling": engine.num_prefilling,
        "prompt_tokens_total": engine.prompt_tokens_total,
        "generation_tokens_total": engine.generation_tokens_total,
        "preemptions_total": engine.preemptions_total,
        "max_num_seqs": engine.limits.max_num_seqs,
    }


def engine_stats(engine) -> EngineStats:
    """A ``ProxyEngine``'s counts as the server reads them (in this process, or sent from an engine process).

    Call it on the thread that steps the engine: the K/V fields walk the caches that a step grows and replaces.
    """
    running_adapters, waiting_adapters = engine.named_pairs_in_use()
    return EngineStats(
        **engine_counts(engine),
        running_adapters=running_adapters, waiting_adapters=waiting_adapters, step_tokens=engine.step_tokens.reading(),
        kv_cache_usage=engine.kv_cache_usage(),
        prefix_caches=tuple(
            PrefixCacheStats(model=runner.name, queries_total=cache.queries_total, hits_total=cache.hits_total,
                             usage=cache.usage)
            for runner in engine.runners
            if (cache := runner.prefix_cache) is not None
        ),
        kv_budgets=tuple(KVBudgetStats(device, budget.in_use(), budget.limit)
                         for device, budget in engine.kv_memory.items() if budget is not None),
    )


class AsyncEngine:
    """Runs ``ProxyEngine.step`` in one background thread and routes its outputs to per-request streams.

    - ``await start()`` loads the models off the event loop (``ready`` turns True) and starts the step thread.
    - ``await add_request(...)`` validates and queues, returning a ``RequestStream``; it raises ``ValueError``
      (bad parameters, a prompt past the context: the message says both lengths) or ``EngineOverloadedError``
      (queue full, or draining) before any output.
    - ``abort(request_id)`` is idempotent and thread-safe; the request's rows leave every model next step.
    """

    def __init__(self, config: EngineConfig, *, idle_wait_s: float = 0.5) -> None:
        self.config = config
        self.engine = None  # ProxyEngine, once loaded
        self._step_stats = EngineStats()  # engine_stats as the step thread last read them
        self.info: ModelInfo | None = None
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._admitting = True
        self._idle_wait_s = idle_wait_s
        self.fatal_error: BaseException | None = None
        self._constrained = constrained_render_pool()

    # --- life cycle ------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return self.engine is not None and alive and self.fatal_error is None

    @property
    def admitting(self) -> bool:
        return self._admitting

    async def start(self) -> None:
        # Importing torch and transformers takes seconds, loading a 70B model minutes: off the event loop, in a
        # daemon thread of its own. (In the default executor, asyncio.run would wait for it at exit: a server
        # told to stop while loading would stop only once loaded.)
        engine = await _in_daemon_thread(self._build, "proxy-engine-load")
        self.info = ModelInfo.of(engine, self.config)
        self._step_stats = engine_stats(engine)  # before the step thread: it then publishes them after each step
        self.engine = engine
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="proxy-engine-step", daemon=True)
        self._thread.start()
        log.info("engine ready: %d models, max_model_len %d", len(engine.models), engine.max_model_len)

    def _build(self):
        from proxy_engine.engine import ProxyEngine
        from proxy_engine.loader import load_models

        return ProxyEngine(load_models(self.config), self.config)

    def stop_admitting(self) -> None:
        """Drain: refuse new requests; running ones go on."""
        self._admitting = False

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # --- requests --------------------------------------------------------------------------------------------
    def _admissible(self, request_id: str, prompt: PromptInput | list[PromptInput], params: SamplingParams
                    ) -> list[PromptInput]:
        """The request's prompts, once it may be admitted at all (a 503 or 400 otherwise). ``n`` is checked here,
        before a stream is sized by it: the engine process registers its stream before the child validates."""
        if self.fatal_error is not None:
            raise EngineOverloadedError("the engine has stopped", retry_after_s=5)
        if not self._admitting:
            raise EngineOverloadedError("the server is shutting down and admits no new requests", retry_after_s=5)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompts = prompt if isinstance(prompt, list) else [prompt]
        if not prompts:
            raise ValueError("the request has no prompt")
        params.check_n()
        return prompts

    async def add_request(
        self,
        request_id: str,
        prompt: PromptInput | list[PromptInput],
        params: SamplingParams,
        target: Target = Target.PROXY,
        *,
        max_logprob_entries: int | None = None,
    ) -> RequestStream:
        """Queue a request: one prompt, or several (prompt ``i``'s ``n`` choices are numbered from ``i * n``; the
        request is admitted or refused as a whole). ``max_logprob_entries`` bounds the logprobs (prompt or per-model)
        the request may return (``ValueError`` past it), so that no answer holds gigabytes of them."""
        engine = self._require_engine()
        prompts = self._admissible(request_id, prompt, params)

        def render() -> tuple[list, Admitted]:
            sequences = make_request_sequences(engine, request_id, prompts, params, target)
            check_logprob_entries(sequences, params, max_logprob_entries)
            return sequences, admitted(sequences, params)

        # Rendering and tokenizing a long prompt takes a while: keep it off the event loop. A constrained request
        # waits there for its grammar to compile: in a pool of its own, so that plain requests never queue behind.
        if params.structured is None:
            sequences, (prompt_tokens, prompt_ids) = await asyncio.to_thread(render)
        else:
            sequences, (prompt_tokens, prompt_ids) = await asyncio.get_running_loop().run_in_executor(
                self._constrained, render)
        stream = RequestStream(request_id, len(sequences), prompt_tokens, prompt_ids)
        self._streams[request_id] = stream
        try:
            engine.add(sequences)
        except (EngineOverloadedError, LookupError):  # full, or its expert pair was removed meanwhile
            del self._streams[request_id]
            raise
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        if self.engine is not None and request_id in self._streams:
            self.engine.abort(request_id)
            self._wake.set()

    async def add_pair(self, pair: ExpertPairConfig, replace: bool = False) -> list[ExpertPairConfig]:
        """Load an expert pair while serving (``ProxyEngine.add_pair``, off the event loop); the engine's pairs once
        it serves the new one."""
        engine = self._require_engine()
        future = await asyncio.to_thread(engine.add_pair, pair, replace)
        self._wake.set()
        return await asyncio.wrap_future(future)

    async def remove_pair(self, name: str) -> list[ExpertPairConfig]:
        """Stop serving an expert pair added while serving (``ProxyEngine.remove_pair``); the engine's pairs."""
        future = self._require_engine().remove_pair(name)
        self._wake.set()
        return await asyncio.wrap_future(future)

    def stats(self) -> EngineStats:
        """The counts as they are now; the K/V fields as the step thread read them after its latest step (the
        server's thread must not walk caches that a step is growing, as the engine process's stats do not)."""
        if self.engine is None:
            return EngineStats()
        return replace(self._step_stats, **engine_counts(self.engine))

    def tokenize(self, prompt: PromptInput, target: Target = Target.PROXY) -> list[int]:
        return self._require_engine().render(prompt, target)

    def prompt_tokens(self, prompt: PromptInput, target: Target = Target.PROXY) -> PromptTokens:
        """The prompt's rendered text, ids and each id's character offsets in it (TGI's /tokenize)."""
        return self._require_engine().tokens(prompt, target)

    def detokenize(self, token_ids: list[int]) -> str:
        engine = self._require_engine()
        if any(not 0 <= t < engine.vocab_size for t in token_ids):
            raise ValueError(f"token ids must be in [0, {engine.vocab_size})")
        return engine.tokenizer.decode(token_ids)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each id's piece of the vocabulary as the tokenizer stores it (``▁Hello``, ``ĠHello``)."""
        return self._require_engine().tokenizer.convert_ids_to_tokens(token_ids)

    def _require_engine(self):
        if self.engine is None:
            raise EngineOverloadedError("the models are still loading", retry_after_s=5)
        return self.engine

    # --- the step thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._steps()
        except BaseException as error:  # noqa: BLE001 - the engine's own guards failed: stop loudly
            # Outside the guarded phases (admission, the inbox, a bug in the loop itself): nothing can be
            # trusted any more. Every open request ends with an error; the server reports "failed" and exits.
            log.exception("the engine step loop crashed")
            self.fatal_error = error
            self._stopping = True
            try:
                self._loop.call_soon_threadsafe(self._fail_all, f"the engine stopped: {type(error).__name__}")
            except RuntimeError:  # the event loop is closed: nobody is waiting
                pass
        finally:  # stopped or crashed: no step will take up a pair change any more
            self.engine.fail_changes(EngineOverloadedError("the engine has stopped", retry_after_s=5))

    def _steps(self) -> None:
        engine = self.engine
        while not self._stopping:
            if not engine.has_work():
                self._wake.wait(self._idle_wait_s)
                self._wake.clear()
                continue
            outputs = engine.step()
            self._step_stats = engine_stats(engine)
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """On the event loop: hand each output to its stream (once per step, not once per token)."""
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.queue.put_nowait(output)
            if output.finished:
                stream.open_choices.discard(output.index)
                if not stream.open_choices:
                    del self._streams[output.request_id]

    def _fail_all(self, message: str) -> None:
        """The step loop died: end every open stream with an error rather than leave it hanging."""
        self._admitting = False
        for request_id, stream in list(self._streams.items()):
            for index in sorted(stream.open_choices):
                stream.queue.put_nowait(
                    RequestOutput.failure(request_id, index, message, prompt_tokens=stream.prompt_tokens)
                )
            stream.open_choices.clear()
        self._streams.clear()
