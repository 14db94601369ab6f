"""``POST /v1/responses`` (OpenAI's Responses API), served by the chat path.

A request becomes a chat conversation (``instructions`` first, then the stored conversation of
``previous_response_id``, then ``input``'s messages, function calls and their outputs), is generated exactly as
``/v1/chat/completions`` would generate it (so greedy output is the same), and the answer goes back as output
items: a ``message`` with ``output_text``, and ``function_call`` items. Streamed, it is the documented event
sequence: ``response.created``, ``response.in_progress``, per item ``response.output_item.added`` (a message's
``response.content_part.added``, ``response.output_text.delta`` ... ``response.output_text.done``,
``response.content_part.done``; a call's ``response.function_call_arguments.delta`` ... ``.done``),
``response.output_item.done``, and ``response.completed`` (``response.incomplete`` when cut by
``max_output_tokens``).

Fields this server cannot honour are a 400 naming the field, never dropped.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, StringConstraints

from server.auth import tenant
from server.background import BackgroundRun, BackgroundRuns
from server.errors import APIError, bad_request
from server.protocol import (
    MAX_CACHE_SALT_CHARS,
    MAX_USER_CHARS,
    ChatCompletionRequest,
    Unhonoured,
    _Lenient,
    chat_logprobs,
    check_text,
    effort_variables,
    refuse_unhonoured,
)
from server.reasoning import Reasoning, ReasoningParser, ReasoningSplitter
from server.response_store import ResponseStore, StoredResponse
from server.serving import Choice, Generation, GenerationError, ServerContext
from server.streaming import EventStreamResponse, sse
from server.tools import ChoiceStream, ToolPlan, check_tools

# OpenAI fields with no implementation here: refused when given a value that would change the answer.
_UNHONOURED = {
    "conversation": Unhonoured("no conversation objects: chain responses with previous_response_id"),
    "prompt": Unhonoured("no stored prompt templates"),
    "max_tool_calls": Unhonoured("the number of tool calls is not capped"),
    "context_management": Unhonoured("no context compaction"),
    "moderation": Unhonoured("no moderation model runs on this server"),
}
_INPUT_TEXT = {"input_text", "output_text", "text"}
# What ``include`` may name. Two change the answer and are honoured: the message's logprobs, and reasoning items'
# ``encrypted_content`` (Codex and the Agents SDK ask for it with ``store: false``, to send the thinking back
# statelessly). The rest name results of tools and image inputs this server refuses, so there is never anything
# for them to add.
LOGPROBS_INCLUDE = "message.output_text.logprobs"
ENCRYPTED_REASONING_INCLUDE = "reasoning.encrypted_content"
INCLUDABLE = frozenset({
    LOGPROBS_INCLUDE, ENCRYPTED_REASONING_INCLUDE, "web_search_call.results", "web_search_call.action.sources",
    "code_interpreter_call.outputs", "computer_call_output.output.image_url", "file_search_call.results",
    "message.input_image.image_url",
})
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
# OpenAI's limits on metadata: 16 pairs, keys up to 64 characters, string values up to 512. It is stored with
# every response, so unbounded it was the way to fill the store's memory.
MAX_METADATA_PAIRS = 16
Metadata = dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]]


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesRequest(_Lenient):
    model: str | None = None
    input: Any = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    metadata: Metadata | None = Field(default=None, max_length=MAX_METADATA_PAIRS)
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    truncation: str | None = None
    include: list[Any] | None = None
    top_logprobs: int | None = None
    # The server's sampling extensions, as on the other endpoints.
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    alpha: float | list[float] | None = None
    # Run after the answer: the response comes back "queued", is read with GET and may be cancelled.
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    reasoning: Any = None
    max_tool_calls: Any = None
    context_management: Any = None
    moderation: Any = None

    def check_supported(self) -> None:
        refuse_unhonoured(self, _UNHONOURED)
        # reasoning.effort goes to the chat templates, as chat's reasoning_effort; summary is a hint (with
        # --reasoning-parser the thinking comes back as reasoning items, their summaries empty).
        if self.reasoning is not None and not isinstance(self.reasoning, dict):
            raise bad_request("reasoning must be an object ({\"effort\": ..., \"summary\": ...})", "reasoning")
        effort_variables((self.reasoning or {}).get("effort"), "reasoning.effort")  # a bad value names its field
        if self.truncation not in (None, "disabled"):
            raise bad_request("truncation 'auto' is not supported: a prompt past the context is a 400", "truncation")
        for k, name in enumerate(self.include or []):
            if not isinstance(name, str) or name not in INCLUDABLE:
                raise bad_request(f"include[{k}] {name!r} is not supported (one of: {', '.join(sorted(INCLUDABLE))})",
                                  f"include[{k}]")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise bad_request(f"max_output_tokens must be at least 1, got {self.max_output_tokens}",
                              "max_output_tokens")
        if self.background and self.store is False:
            raise bad_request("background needs store: true (the response is read back with GET "
                              "/v1/responses/{id})", "background")

    @property
    def wants_logprobs(self) -> bool:
        """The message's logprobs: asked for by ``include``, or implied by a ``top_logprobs`` count."""
        return LOGPROBS_INCLUDE in (self.include or []) or self.top_logprobs is not None

    @property
    def wants_encrypted_reasoning(self) -> bool:
        return ENCRYPTED_REASONING_INCLUDE in (self.include or [])

    def response_format(self) -> dict[str, Any] | None:
        """``text.format`` as chat's ``response_format``."""
        if not self.text:
            return None
        unknown = set(self.text) - {"format", "verbosity"}
        if unknown:
            name = sorted(unknown)[0]
            raise bad_request(f"text.{name} is not supported", f"text.{name}")
        fmt = self.text.get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict):
            raise bad_request("text.format must be an object with a 'type'", "text.format")
        kind = fmt.get("type")
        if kind in ("text", "json_object"):
            return {"type": kind}
        if kind == "json_schema":
            if "schema" not in fmt:
                raise bad_request("text.format.schema is required", "text.format.schema")
            return {"type": "json_schema",
                    "json_schema": {"name": fmt.get("name", "output"), "schema": fmt["schema"],
                                    "strict": fmt.get("strict")}}
        raise bad_request(f"text.format.type {kind!r} is not supported (text, json_object or json_schema)",
                          "text.format.type")

    def input_messages(self) -> list[dict[str, Any]]:
        """``input`` as chat messages (consecutive function calls become one assistant message)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": check_text(self.input, "input")}]
        if not isinstance(self.input, list) or not self.input:
            raise bad_request("input must be a string or a non-empty list of items", "input")
        messages: list[dict[str, Any]] = []
        for i, item in enumerate(self.input):
            where = f"input[{i}]"
            if not isinstance(item, dict):
                raise bad_request(f"{where} must be an object", where)
            kind = item.get("type", "message")
            if kind == "message":
                role = _ROLES.get(item.get("role"))
                if role is None:
                    raise bad_request(f"{where}.role {item.get('role')!r} is not supported", f"{where}.role")
                messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
            elif kind == "function_call":
                call = {"id": item.get("call_id") or item.get("id") or "", "type": "function",
                        "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
                if not isinstance(call["function"]["name"], str):
                    raise bad_request(f"{where}.name is required", f"{where}.name")
                if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls") \
                        and not messages[-1]["content"]:
                    messages[-1]["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "reasoning":
                continue  # an earlier answer's thinking, sent back: chat templates leave past thinking out too
            elif kind == "function_call_output":
                if not item.get("call_id"):
                    raise bad_request(f"{where}.call_id is required", f"{where}.call_id")
                output = item.get("output")
                content = output if isinstance(output, str) else _text(output, f"{where}.output")
                messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": content})
            else:
                raise bad_request(f"{where}.type {kind!r} is not supported (message, function_call, "
                                  "function_call_output, reasoning)", f"{where}.type")
        return messages

    def input_items(self) -> list[dict[str, Any]]:
        """``input`` as the Responses API lists it back (``GET /v1/responses/{id}/input_items``): items with ids,
        a message's text as content parts. Call after ``input_messages`` validated it."""
        if isinstance(self.input, str):
            return [{"id": _id("msg"), "type": "message", "role": "user", "status": "completed",
                     "content": [{"type": "input_text", "text": self.input}]}]
        items = []
        for item in self.input:
            item = dict(item)
            kind = item.setdefault("type", "message")
            if kind == "message":
                content = item.get("content")
                part = "output_text" if item.get("role") == "assistant" else "input_text"
                if isinstance(content, str):
                    item["content"] = [{"type": part, "text": content}]
                item.setdefault("status", "completed")
            prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}.get(kind, "rs")
            item.setdefault("id", _id(prefix))
            items.append(item)
        return items

    def to_chat(self, history: list[dict[str, Any]]) -> ChatCompletionRequest:
        self.check_supported()
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages += history + self.input_messages()
        tools = check_tools(self.tools, flat=True)
        tool_choice = self.tool_choice
        if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
            if not isinstance(tool_choice.get("name"), str):
                raise bad_request('tool_choice must name a function: {"type": "function", "name": ...}',
                                  "tool_choice")
            tool_choice = {"type": "function", "function": {"name": tool_choice["name"]}}
        elif isinstance(tool_choice, dict):
            raise bad_request(f"tool_choice type {tool_choice.get('type')!r} is not supported", "tool_choice")
        fields: dict[str, Any] = {
            "model": self.model, "messages": messages, "tools": tools or None, "tool_choice": tool_choice,
            "parallel_tool_calls": self.parallel_tool_calls, "max_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "response_format": self.response_format(),
            "seed": self.seed, "top_k": self.top_k, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "alpha": self.alpha, "user": self.user,
            "reasoning_effort": (self.reasoning or {}).get("effort"),
        }
        if self.wants_logprobs:  # chat checks top_logprobs' range and names the field
            fields.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        return ChatCompletionRequest(**{k: v for k, v in fields.items() if v is not None})


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return check_text(content, param)
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of text parts", param)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _INPUT_TEXT or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(f"{param}[{j}] has type {kind!r}: only text parts (input_text, output_text) are "
                              "supported", f"{param}[{j}].type")
        texts.append(check_text(part["text"], f"{param}[{j}].text"))
    return "\n".join(texts)


class ResponseBuilder:
    """The Response object of one request, as it grows: items are added as generation goes."""

    def __init__(self, body: ResponsesRequest, chat: ChatCompletionRequest, response_id: str, model: str,
                 plan: ToolPlan) -> None:
        self.body = body
        self.plan = plan
        self.id = response_id
        self.model = model
        self.created_at = time.time()
        self.output: list[dict[str, Any]] = []
        self.tools = [{"type": "function", "name": t["function"]["name"],
                       "description": t["function"].get("description"),
                       "parameters": t["function"].get("parameters"), "strict": t["function"].get("strict", False)}
                      for t in plan.tools] if chat.tools else []

    def snapshot(self, status: str, usage: dict[str, Any] | None = None,
                 incomplete: str | None = None) -> dict[str, Any]:
        body = self.body
        text_format = {"format": {"type": "text"}}
        if body.text and body.text.get("format"):
            text_format = {"format": body.text["format"]}
        tool_choice = body.tool_choice if body.tool_choice is not None else ("auto" if self.tools else "none")
        reasoning = body.reasoning or {}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": time.time() if status in ("completed", "incomplete") else None,
            "error": None, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": self.model,
            "output": [dict(item) for item in self.output], "parallel_tool_calls": self.plan.parallel,
            "previous_response_id": body.previous_response_id, "temperature": body.temperature,
            "top_p": body.top_p, "tool_choice": tool_choice, "tools": self.tools, "text": text_format,
            "truncation": "disabled", "store": bool(body.store), "background": bool(body.background),
            "metadata": body.metadata or {},
            "user": body.user, "usage": usage, "top_logprobs": body.top_logprobs,
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        }


def failed_snapshot(builder: ResponseBuilder, failure: dict[str, Any]) -> dict[str, Any]:
    """The response as it failed: status ``failed`` with the OpenAI ``failure``'s code and message."""
    failed = builder.snapshot("failed")
    failed["error"] = {"code": failure.get("code") or "server_error", "message": failure["message"]}
    return failed


def response_usage(counts: dict[str, Any]) -> dict[str, Any]:
    """Chat's usage object (``Generation.usage``) in the Responses API's names."""
    return {"input_tokens": counts["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": counts["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": counts["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": counts["completion_tokens_details"]["reasoning_tokens"]},
            "total_tokens": counts["total_tokens"]}


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as one assistant message (what a later ``previous_response_id`` continues)."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return [message]


class MessageLogprobs:
    """The logprobs of a response's message, in the Responses shape (chat's entries): the choice's tokens after its
    reasoning. The tokens of thinking belong to the reasoning item, which carries none, as in OpenAI's API."""

    def __init__(self, choice: Choice, parser: ReasoningParser | None) -> None:
        self.choice, self.parser = choice, parser
        self.sent = 0  # tokens already handed to a text delta

    def _first(self) -> int:
        """The message's first token: the one after the thinking's."""
        return self.choice.reasoning_tokens(self.parser)

    def fresh(self) -> list[dict[str, Any]]:
        """The message tokens no delta has carried yet (a delta's text may be held back past its token's)."""
        start = max(self.sent, self._first())
        tokens = self.choice.logprobs[start:]
        self.sent = start + len(tokens)
        return chat_logprobs(tokens)["content"]

    def all(self) -> list[dict[str, Any]]:
        return chat_logprobs(self.choice.logprobs[self._first():])["content"]


def encrypted_reasoning(text: str) -> str:
    """A reasoning item's ``encrypted_content``: opaque to the client, which sends it back to continue statelessly.
    Nothing is secret here (the thinking is in the item's ``content`` too) and chat templates drop past thinking,
    so it is the text, base64-encoded."""
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class ItemStream:
    """Turns one choice's chat deltas (``ChoiceStream``'s, and ``reasoning_content`` ones with a reasoning parser)
    into output items (``reasoning``, ``message``, ``function_call``) and the Responses stream events."""

    def __init__(self, builder: ResponseBuilder, logprobs: MessageLogprobs | None = None,
                 encrypt_reasoning: bool = False) -> None:
        self.builder = builder
        self.logprobs = logprobs  # the message's, when the request included them
        self.encrypt_reasoning = encrypt_reasoning
        self.sequence = 0
        self.reasoning: dict[str, Any] | None = None  # the open reasoning item
        self.message: dict[str, Any] | None = None  # the open message item
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its function_call item

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(data)

    def _index(self, item: dict[str, Any]) -> int:
        return self.builder.output.index(item)

    def feed(self, delta: dict[str, Any]) -> list[str]:
        events = []
        if delta.get("reasoning_content"):
            if self.reasoning is None:
                self.reasoning = {"id": _id("rs"), "type": "reasoning", "summary": [], "status": "in_progress",
                                  "content": [{"type": "reasoning_text", "text": ""}]}
                self.builder.output.append(self.reasoning)
                events.append(self.event("response.output_item.added", output_index=self._index(self.reasoning),
                                         item=_copy(self.reasoning)))
            self.reasoning["content"][0]["text"] += delta["reasoning_content"]
            events.append(self.event("response.reasoning_text.delta", item_id=self.reasoning["id"],
                                     output_index=self._index(self.reasoning), content_index=0,
                                     delta=delta["reasoning_content"]))
        if delta.get("content") or delta.get("tool_calls"):
            events += self._close_reasoning()
        if delta.get("content"):
            if self.message is None:
                self.message = {"id": _id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                                "content": []}
                self.builder.output.append(self.message)
                index = self._index(self.message)
                events.append(self.event("response.output_item.added", output_index=index, item=_copy(self.message)))
                self.message["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                events.append(self.event("response.content_part.added", item_id=self.message["id"],
                                         output_index=index, content_index=0,
                                         part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
            part = self.message["content"][0]
            part["text"] += delta["content"]
            logprobs = self.logprobs.fresh() if self.logprobs else []
            part["logprobs"] += logprobs
            events.append(self.event("response.output_text.delta", item_id=self.message["id"],
                                     output_index=self._index(self.message), content_index=0, delta=delta["content"],
                                     logprobs=logprobs))
        for call in delta.get("tool_calls") or []:
            item = self.calls.get(call["index"])
            function = call.get("function") or {}
            if item is None:  # a call begins: what came before it is whole, a call before it too
                events += self._close_message() + self._close_calls("completed")
                item = {"id": _id("fc"), "type": "function_call", "call_id": call.get("id") or _id("call"),
                        "name": function.get("name", ""), "arguments": "", "status": "in_progress"}
                self.calls[call["index"]] = item
                self.builder.output.append(item)
                events.append(self.event("response.output_item.added", output_index=self._index(item),
                                         item=_copy(item)))
            if function.get("arguments"):
                item["arguments"] += function["arguments"]
                events.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                         output_index=self._index(item), delta=function["arguments"]))
        return events

    def _close_reasoning(self, status: str = "completed") -> list[str]:
        reasoning, self.reasoning = self.reasoning, None
        if reasoning is None:
            return []
        index = self._index(reasoning)
        reasoning["status"] = status
        if self.encrypt_reasoning:
            reasoning["encrypted_content"] = encrypted_reasoning(reasoning["content"][0]["text"])
        return [
            self.event("response.reasoning_text.done", item_id=reasoning["id"], output_index=index, content_index=0,
                       text=reasoning["content"][0]["text"]),
            self.event("response.output_item.done", output_index=index, item=_copy(reasoning)),
        ]

    def _close_message(self, status: str = "completed") -> list[str]:
        message, self.message = self.message, None
        if message is None:
            return []
        index, part = self._index(message), message["content"][0]
        message["status"] = status
        if self.logprobs:  # every token of the message, also those whose text no delta carried
            part["logprobs"] = self.logprobs.all()
        return [
            self.event("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                       text=part["text"], logprobs=part["logprobs"]),
            self.event("response.content_part.done", item_id=message["id"], output_index=index, content_index=0,
                       part=_copy(part)),
            self.event("response.output_item.done", output_index=index, item=_copy(message)),
        ]

    def close(self, status: str) -> list[str]:
        """End every open item (``incomplete`` when the answer was cut)."""
        return self._close_reasoning(status) + self._close_message(status) + self._close_calls(status)

    def _close_calls(self, status: str) -> list[str]:
        """End the open call (calls are written one after another: at most the last is open)."""
        events = []
        for item in self.calls.values():
            if item["status"] != "in_progress":
                continue
            item["status"] = status
            index = self._index(item)
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                     output_index=index, arguments=item["arguments"]))
            events.append(self.event("response.output_item.done", output_index=index, item=_copy(item)))
        return events


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(item))


Start = Callable[..., Awaitable[tuple[Generation, list]]]
Collect = Callable[[Generation, Request], Awaitable[bool]]


def add_responses_routes(router: APIRouter, ctx: ServerContext, start: Start, collect: Collect) -> None:
    settings = ctx.settings
    store = ResponseStore(settings.responses_store_max, settings.responses_store_ttl_s,
                          settings.responses_store_max_mb * 2**20)
    ctx.responses_store = store  # type: ignore[attr-defined] - for tests and metrics
    runs = BackgroundRuns()  # background responses: the running ones, and the last ones' events

    def history(previous: str | None, owner: str | None) -> list[dict[str, Any]]:
        if previous is None:
            return []
        if not store.enabled:
            raise bad_request("previous_response_id needs the response store, which is off on this server "
                              "(responses_store_max: 0): send the whole conversation as input", "previous_response_id")
        entry = store.get(previous, owner)
        if entry is None:
            raise APIError(404, f"previous response {previous!r} was not found (responses are kept for "
                           f"{ctx.settings.responses_store_ttl_s:g}s, {store.max_entries} at most)",
                           param="previous_response_id", code="not_found")
        return [dict(m) for m in entry.messages]

    def not_found(response_id: str) -> APIError:
        return APIError(404, f"response {response_id!r} was not found", param="response_id", code="not_found")

    def stored(response_id: str, owner: str | None) -> StoredResponse:
        """The stored response ``owner`` may read (another tenant's is a 404, as an unknown id)."""
        entry = store.get(response_id, owner)
        if entry is None:
            raise not_found(response_id)
        return entry

    @router.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        response_id = _id("resp")
        owner = tenant(request)
        fmt = ctx.tool_call_format
        past: list[dict[str, Any]] = []
        chat: ChatCompletionRequest | None = None

        def prompt():
            nonlocal chat, past
            if body.background and not store.enabled:
                raise bad_request("background needs the response store, which is off on this server "
                                  "(responses_store_max: 0)", "background")
            past = history(body.previous_response_id, owner)
            chat = body.to_chat(past)
            return chat.prompt_input(fmt)

        generation, _ = await start(response_id, "responses", body.model, prompt,
                                    lambda: chat.sampling_params(fmt, ctx.defaults_for(body.model),
                                                                 ctx.max_logprobs, settings.reasoning_parser),
                                    request,
                                    salt=ctx.cache_salt(owner, body.cache_salt))
        assert chat is not None
        plan = chat.tool_plan(fmt)
        reasoning = Reasoning(chat.reasoning_parser(settings.reasoning_parser, fmt))
        builder = ResponseBuilder(body, chat, response_id, generation.model, plan)
        conversation = past + body.input_messages()
        input_items = body.input_items()

        def keep(snapshot: dict[str, Any], messages: list[dict[str, Any]]) -> None:
            """Store the response in this state (with its conversation, and its input for ``input_items``)."""
            store.put(response_id, owner, snapshot, messages, input_items)

        headers = {"x-request-id": response_id}

        def item_stream() -> ItemStream:
            logprobs = MessageLogprobs(generation.choices[0], reasoning.parser) if body.wants_logprobs else None
            return ItemStream(builder, logprobs, body.wants_encrypted_reasoning)

        def usage() -> dict[str, Any]:
            return response_usage(generation.usage(reasoning.parser, reasoning=True))

        def finished(items: ItemStream) -> tuple[dict[str, Any], list[str]]:
            choice = generation.choices[0]
            incomplete = "max_output_tokens" if choice.finish_reason == "length" else None
            status = "incomplete" if incomplete else "completed"
            tail = items.close(status)
            snapshot = builder.snapshot(status, usage(), incomplete)
            if body.store:
                keep(snapshot, conversation + output_messages(builder.output))
            return snapshot, tail

        async def events(items: ItemStream) -> AsyncIterator[str]:
            """The response's stream events, from ``response.created`` to its end (stored as it ends when asked).
            A background response is ``queued`` until the engine begins it, and stored at each change of state."""
            choice_stream, splitter = ChoiceStream(plan), ReasoningSplitter(reasoning.parser)
            first = "queued" if body.background else "in_progress"
            yield items.event("response.created", response=builder.snapshot(first))
            yield items.event(f"response.{first}", response=builder.snapshot(first))
            begun = not body.background
            try:
                async for output in generation.outputs():
                    if not begun:
                        begun = True
                        snapshot = builder.snapshot("in_progress")
                        keep(snapshot, conversation)
                        yield items.event("response.in_progress", response=snapshot)
                    for delta in reasoning.deltas(splitter, choice_stream, output.text_delta, output.finished):
                        for event in items.feed(delta):
                            yield event
            except Exception as error:  # headers are out: the failure goes in the stream
                failure = generation.error_body()["error"] if isinstance(error, GenerationError) else {
                    "message": "internal error", "type": "server_error", "code": "internal_error"}
                snapshot = failed_snapshot(builder, failure)
                if body.background:
                    keep(snapshot, conversation)
                yield items.event("response.failed", response=snapshot)
                return
            snapshot, tail = finished(items)
            for event in tail:
                yield event
            kind = "response.completed" if snapshot["status"] == "completed" else "response.incomplete"
            yield items.event(kind, response=snapshot)

        if body.stream and not body.background:
            return EventStreamResponse(events(item_stream()), generation.close, headers)

        def whole() -> dict[str, Any]:
            """The finished response (stored when asked), from the generation's whole text."""
            items = item_stream()
            splitter = ReasoningSplitter(reasoning.parser)
            for delta in reasoning.deltas(splitter, ChoiceStream(plan), generation.choices[0].text, True):
                items.feed(delta)
            return finished(items)[0]

        if body.background:
            queued = builder.snapshot("queued")
            keep(queued, conversation)
            items = item_stream()
            run = runs.start(response_id, BackgroundRun(owner, generation))

            def cancelled() -> None:
                """Stopped by a cancel: the engine request aborted, the answer so far stored as ``cancelled``."""
                generation.close("cancelled")
                if run.settled:
                    return
                run.settled = True
                for event in items.close("incomplete"):
                    run.log.append(event)
                snapshot = builder.snapshot("cancelled", usage())
                keep(snapshot, conversation + output_messages(builder.output))

            async def drive() -> None:
                """The generation to its end with no client needed: every event into the run's log, for any
                client to follow (the one that created it, when it asked for a stream, or any later GET)."""
                try:
                    async for event in events(items):
                        run.log.append(event)
                    run.settled = True
                except asyncio.CancelledError:
                    cancelled()
                finally:
                    generation.close()
                    runs.end(response_id)

            run.on_cancel = cancelled
            run.task = asyncio.ensure_future(drive())
            if body.stream:  # the client follows it; leaving does not stop it
                return EventStreamResponse(run.log.follow(), lambda: None, headers)
            return JSONResponse(queued, headers=headers)

        if not await collect(generation, request):  # raises the request's HTTP error if it failed
            return Response(status_code=499)
        return JSONResponse(whole(), headers=headers)

    @router.post("/v1/responses/{response_id:path}/cancel")
    async def cancel_response(response_id: str, request: Request) -> JSONResponse:
        """A running background response stops (status ``cancelled``); one already finished is returned as it
        is, as OpenAI does."""
        owner = tenant(request)
        run = runs.get(response_id, owner, running_only=True)
        if run is not None:
            await run.cancel()
        entry = stored(response_id, owner)
        if not entry.response.get("background"):
            raise bad_request("only a response created with background: true can be cancelled", "response_id")
        return JSONResponse(entry.response)

    @router.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(response_id: str, request: Request,
                               limit: Annotated[int, Query(ge=1, le=100)] = 20,
                               order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
                               after: str | None = None) -> JSONResponse:
        """A stored response's own input, as items (OpenAI's list: newest first by default, ``after`` an item id,
        at most ``limit``)."""
        entry = stored(response_id, tenant(request))
        items = entry.input_items if order == "asc" else entry.input_items[::-1]
        if after is not None:
            ids = [item.get("id") for item in items]
            if after not in ids:
                raise bad_request(f"after: no input item {after!r} in response {response_id!r}", "after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})

    @router.get("/v1/responses/{response_id:path}")
    async def get_response(response_id: str, request: Request, stream: bool = False,
                           starting_after: Annotated[int, Query(ge=-1)] = -1) -> Response:
        """The stored response; with ``stream``, a background response's events after ``starting_after`` (all of
        them by default), then the rest as they come."""
        owner = tenant(request)
        entry = stored(response_id, owner)
        if not stream:
            return JSONResponse(entry.response)
        run = runs.get(response_id, owner)
        if run is None:
            raise bad_request(f"response {response_id!r} has no events to stream: only a background response's "
                              f"are kept (while it runs, then for the last {runs.keep} that finished); GET it "
                              "without stream", "stream")
        return EventStreamResponse(run.log.follow(starting_after), lambda: None, {"x-request-id": response_id})

    @router.delete("/v1/responses/{response_id:path}")
    async def delete_response(response_id: str, request: Request) -> JSONResponse:
        if not store.delete(response_id, tenant(request)):
            raise not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
