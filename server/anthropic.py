"""Anthropic's Messages API, for the clients written for Claude (the ``anthropic`` SDK, Claude Code with
``ANTHROPIC_BASE_URL``, ...), as vLLM serves it: ``POST /v1/messages`` (whole or streamed) and
``POST /v1/messages/count_tokens``. Each request becomes a chat request (``MessagesRequest.to_chat``) and runs on
the chat path (the same ``start`` / ``collect``, tools, reasoning parser and output constraints).

The request (anthropic-sdk-python's ``MessageCreateParams``):

- ``system`` (a string or text blocks) is the system message. A user turn's ``tool_result`` blocks become
  ``tool`` messages (before the turn's text; one with ``is_error`` reads ``Error: ...``), an assistant turn's
  ``tool_use`` blocks its ``tool_calls``; the ``thinking`` blocks of earlier turns are left out, as chat templates
  leave earlier reasoning out. A final assistant turn is a prefill that the models continue. Images and documents
  are refused (the models read text).
- ``tools`` (``name``, ``description``, ``input_schema``; Anthropic's server tools are refused),
  ``tool_choice`` (``auto``; ``any``: a call is required; ``tool``: that one; ``none``;
  ``disable_parallel_tool_use``), ``stop_sequences``, ``temperature``, ``top_p``, ``top_k``,
  ``metadata.user_id``, ``output_config.format`` (a JSON schema the answer follows), ``thinking`` (the chat
  templates' ``enable_thinking``; with a reasoning parser, ``budget_tokens`` caps the thinking), and ours:
  ``alpha``, ``chat_template_kwargs``. Other keys are ignored.

The answer: content blocks ``thinking`` (what a reasoning parser reads as thinking; ``signature`` empty),
``text`` and ``tool_use``; ``stop_reason`` ``end_turn`` | ``max_tokens`` | ``stop_sequence`` (with
``stop_sequence``) | ``tool_use``; ``usage`` with ``input_tokens`` (the prompt tokens not read from the prefix
cache), ``cache_read_input_tokens`` and ``output_tokens``. A stream is Anthropic's named events:
``message_start``, ``ping``, ``content_block_start`` / ``_delta`` / ``_stop`` per block, ``message_delta``
(the stop reason, the output tokens), ``message_stop``; a failure once it has started is an ``error`` event.
Refusals are ``{"type": "error", "error": {"type", "message"}}`` with Anthropic's error types.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import Field, ValidationError

from server.auth import tenant
from server.errors import APIError, ErrorResponse, bad_request, describe_validation_errors, shaped_route
from server.protocol import ChatCompletionRequest, _Lenient, check_text
from server.reasoning import Reasoning, ReasoningSplitter
from server.serving import Choice, Generation, GenerationError, ServerContext
from server.streaming import EventStreamResponse
from server.tools import ChoiceStream

Start = Callable[..., Awaitable[tuple[Generation, list]]]
Collect = Callable[[Generation, Request], Awaitable[bool]]

PATHS = ("/v1/messages", "/v1/messages/count_tokens")

# Anthropic's error types by HTTP status (what its SDK's exception classes mirror).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(status: int, message: str, headers: dict[str, str] | None = None) -> ErrorResponse:
    error_type = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse({"type": "error", "error": {"type": error_type, "message": message}}, status_code=status,
                         headers=headers)


def refusal(error: RequestValidationError | APIError) -> ErrorResponse:
    """A body that does not parse, or a refused request, in Anthropic's shape (the message names the field)."""
    if isinstance(error, RequestValidationError):
        message, _ = describe_validation_errors(list(error.errors()))
        return anthropic_error(400, message)
    return anthropic_error(error.status, error.message, error.headers)


AnthropicRoute = shaped_route(refusal)  # Anthropic's routes: their refusals in Anthropic's shape


# --- the request -------------------------------------------------------------------------------------------------
def _blocks(content: Any, param: str) -> list[dict[str, Any]]:
    """A message's content as blocks: a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(block, dict) for block in content):
        raise bad_request(f"{param} must be a string or a list of content blocks", param)
    return content


def _text_of(blocks: list[dict[str, Any]], param: str) -> str:
    """The text of text blocks (a tool result's, a system prompt's), joined by newlines."""
    texts = []
    for j, block in enumerate(blocks):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad_request(f"{param}[{j}] has type {block.get('type')!r}: only text blocks are supported here",
                              f"{param}[{j}].type")
        texts.append(check_text(block["text"], f"{param}[{j}].text"))
    return "\n".join(texts)


def _user_turn(blocks: list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    """A user turn as chat messages: its tool results (``tool`` messages), then its text."""
    messages, texts = [], []
    for j, block in enumerate(blocks):
        kind, where = block.get("type"), f"{param}[{j}]"
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(check_text(block["text"], f"{where}.text"))
        elif kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad_request(f"{where}.tool_use_id is required", f"{where}.tool_use_id")
            result = block.get("content", "")
            text = _text_of(_blocks(result, f"{where}.content"), f"{where}.content") if result != "" else ""
            if block.get("is_error"):  # a chat tool message has no such flag: the models read it in the text
                text = f"Error: {text}"
            messages.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        else:
            raise bad_request(f"{where} has type {kind!r}: a user turn may hold text and tool_result blocks here "
                              "(the models read text)", f"{where}.type")
    if texts:
        messages.append({"role": "user", "content": "\n".join(texts)})
    return messages


def _assistant_turn(blocks: list[dict[str, Any]], param: str) -> dict[str, Any]:
    """An assistant turn as a chat message: its text, and its tool_use blocks as ``tool_calls``."""
    texts, calls = [], []
    for j, block in enumerate(blocks):
        kind, where = block.get("type"), f"{param}[{j}]"
        if kind == "text" and isinstance(block.get("text"), str):  # joined as written: one prefill over blocks
            texts.append(check_text(block["text"], f"{where}.text"))
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
                    or not isinstance(block.get("input"), dict):
                raise bad_request(f"{where}: a tool_use block needs an id, a name and an input object", where)
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": json.dumps(block["input"])}})
        elif kind not in ("thinking", "redacted_thinking"):  # earlier reasoning is not shown to the models again
            raise bad_request(f"{where} has type {kind!r}: an assistant turn may hold text, tool_use and thinking "
                              "blocks", f"{where}.type")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic's client tools as chat function tools (the chat path checks their schemas)."""
    converted = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise bad_request(f"tools[{i}] must be an object", f"tools[{i}]")
        if tool.get("type") not in (None, "custom"):
            raise bad_request(f"tools[{i}] has type {tool['type']!r}: Anthropic's server tools do not run here; "
                              "declare a client tool (name, description, input_schema)", f"tools[{i}].type")
        if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
            raise bad_request(f"tools[{i}] needs a name and an input_schema object", f"tools[{i}]")
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        converted.append({"type": "function", "function": function})
    return converted


def _tool_choice(choice: dict[str, Any] | None) -> tuple[Any, bool | None]:
    """Anthropic's tool_choice as chat's, and whether parallel calls are allowed (None: the default)."""
    if choice is None:
        return None, None
    kind = choice.get("type")
    parallel = False if choice.get("disable_parallel_tool_use") else None
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise bad_request(f"tool_choice type {kind!r} is not one of auto, any, tool (with a name) or none",
                      "tool_choice")


# Roles some clients send that Anthropic's spec does not name: Claude Code's newer versions write context and
# messages as "ctx" and "msg" user turns (vLLM maps them so too).
CLIENT_ROLES = {"ctx": "user", "msg": "user"}


class Conversation(_Lenient):
    """What a Messages request and a token count share: the model, the turns, the system prompt and the tools."""

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def chat_messages(self) -> list[dict[str, Any]]:
        messages = []
        if self.system:
            system = self.system if isinstance(self.system, str) else _text_of(self.system, "system")
            messages.append({"role": "system", "content": check_text(system, "system")})
        for i, message in enumerate(self.messages):
            role, param = message.get("role"), f"messages[{i}].content"
            if not isinstance(role, str):
                raise bad_request(f"messages[{i}].role must be 'user' or 'assistant'", f"messages[{i}].role")
            role = CLIENT_ROLES.get(role, role)
            blocks = _blocks(message.get("content"), param)
            if role == "user":
                messages += _user_turn(blocks, param)
            elif role == "assistant":
                messages.append(_assistant_turn(blocks, param))
            elif role == "system":  # not Anthropic's, but clients translating from OpenAI's messages send it
                messages.append({"role": "system", "content": check_text(_text_of(blocks, param), param)})
            else:
                raise bad_request(f"messages[{i}].role {role!r} is not user or assistant", f"messages[{i}].role")
        return messages

    def template_kwargs(self) -> dict[str, Any] | None:
        """``thinking`` as the chat templates read it (Qwen3's, ...), under what the request set itself."""
        kind = (self.thinking or {}).get("type")
        if kind not in ("enabled", "disabled", "adaptive"):
            return self.chat_template_kwargs
        return {"enable_thinking": kind != "disabled", **(self.chat_template_kwargs or {})}

    def chat_fields(self) -> dict[str, Any]:
        tool_choice, parallel = _tool_choice(self.tool_choice)
        # A final assistant turn is a prefill of the answer, which the models continue (vLLM's
        # continue_final_message); the answer holds the continuation only, as Anthropic's does.
        prefill = self.messages[-1].get("role") == "assistant"
        return {"model": self.model, "messages": self.chat_messages(),
                "tools": _tools(self.tools) if self.tools else None, "tool_choice": tool_choice,
                "parallel_tool_calls": parallel, "chat_template_kwargs": self.template_kwargs(),
                "continue_final_message": prefill or None, "add_generation_prompt": False if prefill else None}

    def to_chat(self, **fields: Any) -> ChatCompletionRequest:
        """The chat request this conversation is, with ``fields`` (the sampling ones) beside it; None: left out."""
        fields = {**self.chat_fields(), **fields}
        if not fields["messages"]:
            raise bad_request("messages holds no content: every turn is empty (a turn needs a text, image, "
                              "tool_use or tool_result block)", "messages")
        try:
            return ChatCompletionRequest(**{k: v for k, v in fields.items() if v is not None})
        except ValidationError as error:  # what the turns became is no chat (every one empty, say): the client's
            message, param = describe_validation_errors(error.errors())
            raise bad_request(message, param) from None


class MessagesRequest(Conversation):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    alpha: float | list[float] | None = None  # ours: the strength of the expert pairs, as on the other endpoints

    def response_format(self) -> dict[str, Any] | None:
        """``output_config.format`` (a JSON schema) as chat's ``response_format``."""
        form = (self.output_config or {}).get("format")
        if form is None:
            return None
        if not isinstance(form, dict) or form.get("type") != "json_schema" or not isinstance(form.get("schema"), dict):
            raise bad_request('output_config.format must be {"type": "json_schema", "schema": {...}}',
                              "output_config.format")
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": form["schema"]}}

    def thinking_budget(self) -> int | None:
        """``thinking.budget_tokens`` (with ``type: enabled``): the cap on the thinking's tokens."""
        thinking = self.thinking or {}
        budget = thinking.get("budget_tokens")
        if thinking.get("type") != "enabled" or budget is None:
            return None
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise bad_request(f"thinking.budget_tokens must be a count of tokens, got {budget!r}",
                              "thinking.budget_tokens")
        return budget

    def to_chat(self, reads_thinking: bool = False) -> ChatCompletionRequest:
        """``reads_thinking``: the server has a reasoning parser, so ``budget_tokens`` caps the thinking (without
        one, no thinking is read, and the budget asks for nothing)."""
        user = (self.metadata or {}).get("user_id")
        return super().to_chat(max_tokens=self.max_tokens, stop=self.stop_sequences, temperature=self.temperature,
                               top_p=self.top_p, top_k=self.top_k, user=user if isinstance(user, str) else None,
                               alpha=self.alpha, response_format=self.response_format(),
                               thinking_token_budget=self.thinking_budget() if reads_thinking else None)


# --- the answer --------------------------------------------------------------------------------------------------
def stop_reason(choice: Choice, made_calls: bool) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` for a finished choice, and the ``stop_sequence`` that ended it."""
    if choice.finish_reason == "length":
        return "max_tokens", None
    if made_calls:
        return "tool_use", None
    if isinstance(choice.stop_reason, str):
        return "stop_sequence", choice.stop_reason
    return "end_turn", None


def usage(generation: Generation) -> dict[str, int]:
    cached = generation.cached_tokens
    return {"input_tokens": generation.prompt_tokens - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": generation.completion_tokens}


def _input(arguments: str) -> dict[str, Any]:
    """A tool_use block's input: the call's arguments, or ``{}`` where max_tokens cut them short (the streamed
    ``input_json_delta`` pieces still hold what was written)."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def event(kind: str, **fields: Any) -> str:
    """One server-sent event, named as Anthropic names them (its SDK dispatches on the ``event:`` line)."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"


class BlockStream:
    """Turns one choice's chat deltas (``ChoiceStream``'s, and ``reasoning_content`` ones with a reasoning parser)
    into content blocks (``thinking``, ``text``, ``tool_use``) and their stream events."""

    def __init__(self) -> None:
        self.blocks: list[dict[str, Any]] = []
        self.open: int | None = None  # the index of the block being written
        self.calls: dict[int, int] = {}  # chat tool-call index -> its block's index
        self.arguments: dict[int, str] = {}  # a tool_use block's index -> its input JSON so far
        self.made_calls = False

    def _start(self, block: dict[str, Any]) -> list[str]:
        events = self._stop()
        self.blocks.append(block)
        self.open = len(self.blocks) - 1
        return events + [event("content_block_start", index=self.open, content_block=dict(block))]

    def _stop(self) -> list[str]:
        index, self.open = self.open, None
        if index is None:
            return []
        if index in self.arguments:
            self.blocks[index]["input"] = _input(self.arguments[index])
        return [event("content_block_stop", index=index)]

    def feed(self, delta: dict[str, Any]) -> list[str]:
        events = []
        if delta.get("reasoning_content"):
            if self.open is None or self.blocks[self.open]["type"] != "thinking":
                events += self._start({"type": "thinking", "thinking": "", "signature": ""})
            self.blocks[self.open]["thinking"] += delta["reasoning_content"]
            events.append(event("content_block_delta", index=self.open,
                                delta={"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
        if delta.get("content"):
            if self.open is None or self.blocks[self.open]["type"] != "text":
                events += self._start({"type": "text", "text": ""})
            self.blocks[self.open]["text"] += delta["content"]
            events.append(event("content_block_delta", index=self.open,
                                delta={"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            if call["index"] not in self.calls:
                self.made_calls = True
                events += self._start({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                                       "name": function.get("name", ""), "input": {}})
                self.calls[call["index"]] = self.open
                self.arguments[self.open] = ""
            index = self.calls[call["index"]]
            if function.get("arguments"):
                self.arguments[index] += function["arguments"]
                events.append(event("content_block_delta", index=index,
                                    delta={"type": "input_json_delta", "partial_json": function["arguments"]}))
        return events

    def close(self) -> list[str]:
        return self._stop()


# --- the routes --------------------------------------------------------------------------------------------------
def add_anthropic_routes(router: APIRouter, ctx: ServerContext, start: Start, collect: Collect) -> None:
    anthropic = APIRouter(route_class=AnthropicRoute)

    @anthropic.post("/v1/messages")
    async def create_message(body: MessagesRequest, request: Request) -> Response:
        message_id = f"msg_{uuid.uuid4().hex}"
        fmt = ctx.tool_call_format
        chat: ChatCompletionRequest | None = None

        def prompt():
            nonlocal chat
            chat = body.to_chat(reads_thinking=ctx.settings.reasoning_parser is not None)
            return chat.prompt_input(fmt)

        generation, _ = await start(message_id, "messages", body.model, prompt,
                                    lambda: chat.sampling_params(fmt, ctx.defaults_for(body.model), ctx.max_logprobs,
                                                                 ctx.settings.reasoning_parser),
                                    request, ctx.cache_salt(tenant(request), None))
        assert chat is not None
        plan = chat.tool_plan(fmt)
        reasoning = Reasoning(chat.reasoning_parser(ctx.settings.reasoning_parser, fmt))
        headers = {"x-request-id": message_id, "request-id": message_id}

        def message(blocks: BlockStream, done: bool) -> dict[str, Any]:
            reason, sequence = stop_reason(generation.choices[0], blocks.made_calls) if done else (None, None)
            return {"id": message_id, "type": "message", "role": "assistant", "model": generation.model,
                    "content": blocks.blocks if done else [], "stop_reason": reason, "stop_sequence": sequence,
                    "usage": usage(generation)}

        async def events() -> AsyncIterator[str]:
            blocks, choice_stream, splitter = BlockStream(), ChoiceStream(plan), ReasoningSplitter(reasoning.parser)
            yield event("message_start", message=message(blocks, False))
            yield event("ping")
            try:
                async for output in generation.outputs():
                    for delta in reasoning.deltas(splitter, choice_stream, output.text_delta, output.finished):
                        for item in blocks.feed(delta):
                            yield item
            except Exception as error:  # headers are out: the failure goes in the stream
                failure = generation.api_error() if isinstance(error, GenerationError) else APIError(500, "internal "
                                                                                                         "error")
                yield event("error", error={"type": ERROR_TYPES.get(failure.status, "api_error"),
                                            "message": failure.message})
                return
            for item in blocks.close():
                yield item
            whole = message(blocks, True)
            yield event("message_delta", delta={"stop_reason": whole["stop_reason"],
                                                "stop_sequence": whole["stop_sequence"]}, usage=whole["usage"])
            yield event("message_stop")

        if body.stream:
            return EventStreamResponse(events(), generation.close, headers)
        if not await collect(generation, request):  # raises the request's HTTP error if it failed
            return Response(status_code=499)
        blocks = BlockStream()
        splitter = ReasoningSplitter(reasoning.parser)
        for delta in reasoning.deltas(splitter, ChoiceStream(plan), generation.choices[0].text, True):
            blocks.feed(delta)
        blocks.close()
        return JSONResponse(message(blocks, True), headers=headers)

    @anthropic.post("/v1/messages/count_tokens")
    async def count_tokens(body: Conversation) -> dict[str, int]:
        """The prompt's tokens as the named model reads it (its chat template or transcript, with the tools)."""
        _, target = ctx.resolve_model(body.model)
        ctx.check_available()
        fmt = ctx.tool_call_format
        chat = body.to_chat()
        chat.tool_plan(fmt)  # a bad tool or tool_choice is refused as on /v1/messages
        tokens = await ctx.rendered(chat.prompt_input(fmt), lambda prompt: ctx.engine.tokenize(prompt, target))
        return {"input_tokens": len(tokens)}

    router.include_router(anthropic)
