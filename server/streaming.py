"""Server-sent events: the chunk sequences of both endpoints, and a response that aborts on disconnect.

Per choice the order is fixed: (chat) a role-first chunk, content chunks with ``finish_reason: null``, one
final chunk with an empty delta and the finish reason; then a usage chunk with ``choices: []`` when asked
for, then ``data: [DONE]``. An engine error after the 200 went out becomes ``data: {"error": ...}`` and
``[DONE]``.

With vLLM's ``return_token_ids`` every choice chunk carries ``token_ids`` (the ids it adds; ``[]`` when none),
and the prompt's ids come once: on each choice's first chunk (completions) or at the top of the stream's first
chunk (chat). ``return_tokens_as_token_ids`` names logprob tokens ``token_id:<id>``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from proxy_engine.request import ErrorCode, RequestOutput
from server.protocol import chat_logprobs, completion_logprobs, model_logprobs
from server.reasoning import Reasoning, ReasoningSplitter
from server.serving import Generation, GenerationError
from server.tools import ChoiceStream, ToolPlan, finish_reason

logger = logging.getLogger("proxy_serve")

DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _error_event(generation: Generation, error: BaseException) -> str:
    if not isinstance(error, GenerationError):
        logger.error("request %s failed while streaming", generation.request_id, exc_info=error)
        generation.error, generation.error_code = "internal error", ErrorCode.INTERNAL_ERROR
    return sse(generation.error_body())  # its type and code say which: internal_error, timeout, shutdown


def _analysis(output: RequestOutput) -> dict[str, Any]:
    """A content chunk's ``model_logprobs`` (its tokens' entries), only when the request asked for them."""
    return {"model_logprobs": model_logprobs(output.model_logprobs)} if output.model_logprobs else {}


Chunk = Callable[..., str]  # (choices, **extra fields) -> one SSE event


@dataclass(frozen=True)
class TokenIds:
    """vLLM's token-id extensions, as a stream renders them: ``each`` (``return_token_ids``) and ``names``
    (``return_tokens_as_token_ids``)."""

    each: bool = False
    names: bool = False


def token_ids_view(body: Any) -> TokenIds:
    return TokenIds(bool(body.return_token_ids), bool(body.return_tokens_as_token_ids))


def _with_ids(entry: dict[str, Any], ids: TokenIds, new_ids: list[int] | None = None) -> dict[str, Any]:
    if ids.each:
        entry["token_ids"] = list(new_ids or [])
    return entry


def _usage(generation: Generation, reasoning: Reasoning | None) -> dict[str, Any]:
    """The usage so far; a chat's (``reasoning`` given) with its reasoning tokens."""
    return generation.usage() if reasoning is None else generation.usage(reasoning.parser, reasoning=True)


def _chunker(generation: Generation, kind: str, created: int, include_usage: bool, continuous: bool,
             reasoning: Reasoning | None = None) -> Chunk:
    """Builds the endpoint's chunks: ``kind`` is the object name; ``usage`` is null until the usage chunk, or,
    ``continuous`` (vLLM's ``continuous_usage_stats``), the counts so far in every chunk."""
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": generation.request_id, "object": kind, "created": created, "model": generation.model,
                "choices": choices}
        if include_usage:
            body["usage"] = _usage(generation, reasoning) if continuous else None
        body.update(extra)
        return sse(body)

    return chunk


async def _ended(
    generation: Generation, events: AsyncIterator[str], chunk: Chunk, include_usage: bool,
    reasoning: Reasoning | None = None,
) -> AsyncIterator[str]:
    """``events``, then the usage chunk when asked for and ``[DONE]``; a failure after the 200 went out becomes
    an error event and ``[DONE]`` (no usage)."""
    async with aclosing(events):
        try:
            async for event in events:
                yield event
        except Exception as error:  # headers are out: the error goes in the stream
            yield _error_event(generation, error)
            yield DONE
            return
    if include_usage:
        yield chunk([], usage=_usage(generation, reasoning))
    yield DONE


def completion_events(
    generation: Generation, *, created: int, echo: list[str] | None, include_usage: bool,
    prompt_logprobs: bool = False, continuous_usage: bool = False, ids: TokenIds = TokenIds(),
) -> AsyncIterator[str]:
    """``echo``: each choice's prompt text, sent before its first token."""
    chunk = _chunker(generation, "text_completion", created, include_usage, continuous_usage)
    unsent_prompt = set(range(len(generation.choices))) if ids.each else set()

    def entry(index: int, text: str, logprobs: Any, reason: str | None, new_ids: list[int] | None = None,
              **extra: Any) -> dict[str, Any]:
        out = _with_ids({"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason, **extra}, ids,
                        new_ids)
        if index in unsent_prompt:  # a choice's first chunk
            unsent_prompt.discard(index)
            out["prompt_token_ids"] = generation.prompt_ids(index)
        return out

    async def events() -> AsyncIterator[str]:
        # Character offset of the next token in each choice's returned text (for logprobs' text_offset).
        offsets = [0] * len(generation.choices)
        if echo is not None:
            for choice in generation.choices:
                text = echo[choice.index]
                offsets[choice.index] = len(text)
                # With prompt logprobs the echo waits for them: they come with each choice's first output.
                if text and not prompt_logprobs:
                    yield chunk([entry(choice.index, text, None, None)])
        async for output in generation.outputs():
            if output.prompt_logprobs is not None:
                text = echo[output.index] if echo else ""

                def first(output=output, text=text) -> str:
                    logprobs = completion_logprobs([], 0, output.prompt_logprobs, ids.names)
                    return chunk([entry(output.index, text, logprobs, None)])

                yield await asyncio.to_thread(first)  # one entry per prompt token: built off the event loop
            if output.text_delta or output.logprobs or output.model_logprobs or (ids.each and output.new_token_ids):
                logprobs = None
                if output.logprobs is not None:
                    logprobs = completion_logprobs(output.logprobs, offsets[output.index], as_ids=ids.names)
                offsets[output.index] += len(output.text_delta)
                yield chunk([entry(output.index, output.text_delta, logprobs, None, output.new_token_ids,
                                   **_analysis(output))])
            if output.finished:
                choice = generation.choices[output.index]
                yield chunk([entry(output.index, "", None, choice.finish_reason, stop_reason=choice.stop_reason)])

    return _ended(generation, events(), chunk, include_usage)


def chat_events(
    generation: Generation, *, created: int, include_usage: bool, plan: ToolPlan | None = None,
    continuous_usage: bool = False, reasoning: Reasoning | None = None, ids: TokenIds = TokenIds(), echo: str = "",
) -> AsyncIterator[str]:
    """``plan``: the request's tools; each choice's text goes out as content or tool-call deltas (server/tools.py),
    its thinking as ``reasoning_content`` deltas when ``reasoning`` has a parser (server/reasoning.py). ``echo``
    (vLLM's chat echo: the continued assistant message) is the content of each choice's first chunk."""
    plan = plan or ToolPlan("text")
    reasoning = reasoning or Reasoning()
    streams = {choice.index: ChoiceStream(plan) for choice in generation.choices}
    splitters = {choice.index: ReasoningSplitter(reasoning.parser) for choice in generation.choices}
    chunk = _chunker(generation, "chat.completion.chunk", created, include_usage, continuous_usage, reasoning)

    async def events() -> AsyncIterator[str]:
        for choice in generation.choices:
            top = {"prompt_token_ids": generation.prompt_ids(0)} if ids.each and choice.index == 0 else {}
            yield chunk([_with_ids({"index": choice.index, "delta": {"role": "assistant", "content": echo},
                                    "logprobs": None, "finish_reason": None}, ids)], **top)
        async for output in generation.outputs():
            stream = streams[output.index]
            deltas = reasoning.deltas(splitters[output.index], stream, output.text_delta, output.finished)
            logprobs = chat_logprobs(output.logprobs, ids.names) if output.logprobs else None
            if (logprobs is not None or output.model_logprobs or (ids.each and output.new_token_ids)) and not deltas:
                deltas = [{"content": ""}]  # logprobs (and ids) of held-back text still go out with their token
            for k, delta in enumerate(deltas):
                yield chunk([_with_ids({"index": output.index, "delta": delta, "logprobs": logprobs if k == 0 else None,
                                        "finish_reason": None, **(_analysis(output) if k == 0 else {})}, ids,
                                       output.new_token_ids if k == 0 else None)])
            if output.finished:
                reason = finish_reason(stream.made_calls, generation.choices[output.index].finish_reason)
                yield chunk([_with_ids({"index": output.index, "delta": {}, "logprobs": None, "finish_reason": reason,
                                        "stop_reason": generation.choices[output.index].stop_reason}, ids)])

    return _ended(generation, events(), chunk, include_usage, reasoning)


async def off_the_loop(answer: Callable[[], Any], headers: dict[str, str] | None = None) -> Response:
    """An answer that can be megabytes (logprobs: with echo one entry per prompt token per choice; per-model logprobs
    one per model per token; TGI's /tokenize, an entry per prompt token), built and encoded in a worker thread so
    that other streams and /health go on."""
    content = await asyncio.to_thread(lambda: JSONResponse(answer()).body)
    return Response(content, media_type="application/json", headers=headers)


class EventStreamResponse(Response):
    """Sends ``events`` as ``text/event-stream`` while watching for the client leaving.

    Whatever ends the stream (last event, disconnect, a failed send, cancellation at shutdown), ``on_close``
    runs once, right then: the route passes ``Generation.close``, which aborts an unfinished engine request.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None], headers: dict[str, str]) -> None:
        # Not Response.__init__: it would declare a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await send({"type": "http.response.start", "status": self.status_code,
                                    "headers": self.raw_headers})
                        async for event in self.events:
                            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except OSError:  # the client went away between two sends
                        pass
                    group.cancel_scope.cancel()

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(watch_disconnect)
        finally:
            try:
                await self.events.aclose()  # type: ignore[attr-defined]
            finally:
                self.on_close()
