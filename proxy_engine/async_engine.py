"""The asyncio face of the engine: submit a request, iterate its outputs, abort it.

The model work runs in one background thread (the step loop); outputs cross back to the event loop once per
step, routed to a per-request ``asyncio.Queue``. This is the only module the server talks to.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from proxy_engine.config import EngineConfig
from proxy_engine.request import PromptInput, RequestOutput, SamplingParams, Target


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about the loaded models (no tensors)."""

    base_path: str
    expert_paths: list[str]
    max_model_len: int  # the smallest of the models' limits (and the configured cap)
    vocab_size: int
    default_alphas: list[float]
    eos_token_ids: list[int]


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences in the decode batch
    waiting: int  # sequences queued, not yet prefilling
    prefilling: int  # sequences whose prompts are being prefilled
    prompt_tokens_total: int
    generation_tokens_total: int


class RequestStream:
    """Async iterator over one request's ``RequestOutput`` deltas (all choices interleaved, by ``index``).

    Iteration ends after every choice has finished. ``prompt_tokens`` is known as soon as the request is
    accepted. Leaving the iteration early does not abort: call ``AsyncEngine.abort`` (the server does so
    when the client disconnects).
    """

    def __init__(self, request_id: str, n: int, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._unfinished = n

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while self._unfinished > 0:
            output = await self.queue.get()
            if output.finished:
                self._unfinished -= 1
            yield output


class AsyncEngine:
    """Public contract (implementation lands in this file; see docs/architecture.md).

    - ``AsyncEngine(config: EngineConfig)``: builds nothing yet.
    - ``await start()``: loads the models off the event loop (``ready`` turns True), starts the step thread.
    - ``info: ModelInfo`` once started.
    - ``await add_request(request_id, prompt: PromptInput, params: SamplingParams, target=Target.PROXY)``
      returns a ``RequestStream``; raises ``ValueError`` (bad parameters, prompt past the context: the
      message says both lengths) or ``EngineOverloadedError`` (queue full or draining) before any output.
    - ``abort(request_id)``: idempotent, thread-safe; frees the request's rows in every model within a step.
    - ``stats() -> EngineStats``; ``tokenize(prompt, target) -> list[int]``; ``detokenize(ids) -> str``.
    - ``stop_admitting()`` (drain: new requests get EngineOverloadedError); ``await shutdown()``.
    """
