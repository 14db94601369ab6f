"""Tool calls on the wire: validate ``tools`` and ``tool_choice``, constrain ``required`` / named choices, and turn
each choice's generated text into ``message.tool_calls`` (whole) or OpenAI's ``delta.tool_calls`` (streamed).

- ``none``: the tools are not shown to the models; the answer is text.
- ``auto``: the models see the tools (a chat expert through its template, the others through the transcript)
  and answer freely; the family's call format (``proxy_engine/tool_calls.py``) is parsed out of the answer.
  A family with no call format (no chat template of it renders tools) is served the chat without the tools, with
  a warning: under ``auto`` a model may always answer in text, and this one can only do that (see ``plan``).
- a named function: the answer is generated under that function's parameter schema: it IS the arguments.
- ``required``: the answer is generated under a schema for ``[{"name": ..., "parameters": {...}}, ...]``
  (one item when ``parallel_tool_calls`` is false), so every call is valid against its function's parameters.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy_engine.grammar import StructuredOutput, json_depth
from proxy_engine.tool_calls import (
    DEFAULT_FORMAT,
    MARKED_FORMATS,
    CallHead,
    ParsedCall,
    arguments_reader,
    call_arguments,
    call_heads,
    listed_calls,
    looks_like_call_start,
    marker_prefix_len,
    parse_calls,
    value_end,
)
from server.canonical_json import CanonicalJson
from server.errors import bad_request
from server.guards import clip

logger = logging.getLogger("proxy_serve")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_warned_no_format = False  # the first tools-without-a-format request is a warning; later ones are debug lines
EMPTY_PARAMETERS = {"type": "object", "properties": {}}
MAX_TOOLS = 128  # OpenAI's limit on tools in one request
# Nesting of one tool's parameters (objects and arrays). The required / named constraint wraps them a few
# levels deeper, within the grammar's own limit (proxy_engine.grammar.MAX_SPEC_DEPTH).
MAX_PARAMETERS_DEPTH = 48


_ALPHANUMERIC = string.ascii_letters + string.digits


def new_call_id(fmt: str | None = None) -> str:
    """A call's id: OpenAI's shape, or for the mistral format the 9 letters and digits that Mistral's chat templates
    require of the ids sent back to them (as vLLM's mistral parser makes them)."""
    if fmt == "mistral":
        return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    """What a request's tools mean for generation and for the answer."""

    mode: str  # "text" (no tools, or tool_choice none), "auto", "named", "required"
    tools: list[dict[str, Any]] = field(default_factory=list)  # shown to the models (empty for "text")
    name: str | None = None  # the named function
    parallel: bool = True
    fmt: str = "hermes"
    dropped: int = 0  # tools left out under auto: the family has no tool-call format

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether the answer must be decoded with special tokens kept: it may hold calls whose marker some
        tokenizers make a special token (``MARKED_FORMATS``)."""
        return self.mode == "auto" and self.fmt in MARKED_FORMATS

    @property
    def constraint(self) -> StructuredOutput | None:
        if self.mode == "named":
            return StructuredOutput("json_schema", _parameters(self._function(self.name)), param="tools")
        if self.mode == "required":
            items = [
                {"type": "object",
                 "properties": {"name": {"const": t["function"]["name"]}, "parameters": _parameters(t["function"])},
                 "required": ["name", "parameters"], "additionalProperties": False}
                for t in self.tools
            ]
            schema: dict[str, Any] = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutput("json_schema", schema, param="tools")
        return None

    def _function(self, name: str | None) -> dict[str, Any]:
        return next(t["function"] for t in self.tools if t["function"]["name"] == name)

    def calls(self, text: str, cut: bool = False) -> tuple[str | None, list[ParsedCall]]:
        """``(content, calls)`` of a finished answer. ``cut``: ``max_tokens`` ended it, so a call may be unfinished;
        the calls written whole before it are kept, as the answer's stream sent them (``calls_before_cut``)."""
        if self.mode == "named":
            try:
                arguments = json.loads(text)
            except json.JSONDecodeError:
                return text, []  # cut by max_tokens: no complete call
            return None, [ParsedCall(self.name or "", json.dumps(arguments, ensure_ascii=False))]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:  # the constraint's array is always whole unless max_tokens cut it
                return calls_before_cut(self, text)
            if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                                      and isinstance(i.get("parameters"), dict) for i in items):
                return text, []  # not the constraint's shape (it guarantees it): text rather than a crash
            return None, [ParsedCall(i["name"], json.dumps(i["parameters"], ensure_ascii=False)) for i in items]
        if self.mode == "auto":
            content, calls = parse_calls(self.fmt, text, self.tools)
            known = {t["function"]["name"] for t in self.tools}
            if not calls or any(c.name not in known for c in calls):
                return calls_before_cut(self, text) if cut else (text, [])
            return content, calls if self.parallel else calls[:1]
        return text, []


def calls_before_cut(plan: ToolPlan, text: str) -> tuple[str | None, list[ParsedCall]]:
    """A cut answer read as its stream read it: the content before the first call and the calls whose arguments were
    written whole, in the very strings the stream sent; the text itself when no call was whole. So a client sees the
    same calls whether it streamed or not (the stream has already sent the whole ones, and the cut one's start)."""
    stream = ChoiceStream(plan)
    arguments: dict[int, str] = {}
    for delta in stream.feed(text):
        for call in delta.get("tool_calls", []):
            arguments[call["index"]] = arguments.get(call["index"], "") + call["function"]["arguments"]
    calls = []
    for call in stream.calls:
        if not call.whole:
            break
        calls.append(ParsedCall(call.head.name, arguments[call.index]))
    if not calls:
        return text, []
    return text[:stream.sent] or None, calls


def _parameters(function: dict[str, Any]) -> Any:
    return function.get("parameters") or EMPTY_PARAMETERS


def check_tools(tools: Any, param: str = "tools", flat: bool = False) -> list[dict[str, Any]]:
    """OpenAI function tools, normalised to ``{"type": "function", "function": {...}}``; anything else is a 400.

    ``flat``: the Responses API's shape (``{"type": "function", "name", "parameters", ...}``).
    """
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request(f"{param} must be a list of tools", param)
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"at most {MAX_TOOLS} tools in one request, got {len(tools)}", param)
    checked, names = [], set()
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise bad_request(f"{where}.type {kind!r} is not supported: only function tools are", f"{where}.type")
        function = {k: v for k, v in tool.items() if k != "type"} if flat else tool.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"{where}.function must be an object with a 'name'", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise bad_request(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}",
                              f"{where}.function.name")
        if name in names:
            raise bad_request(f"{where}: two tools are named {name!r}", f"{where}.function.name")
        names.add(name)
        check_parameters(function.get("parameters"), f"{where}.parameters" if flat else f"{where}.function.parameters")
        kept = {"name": name}
        for key in ("description", "parameters", "strict"):
            if function.get(key) is not None:
                kept[key] = function[key]
        checked.append({"type": "function", "function": kept})
    return checked


def check_parameters(parameters: Any, param: str) -> None:
    """A function's ``parameters``: an object schema, as OpenAI requires (a call's arguments are a JSON object;
    a ``{"type": "string"}`` schema made a named call's arguments a JSON string), nested within bounds."""
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise bad_request(f"{param} must be a JSON schema object", param)
    kind = parameters.get("type", "object")
    if kind != "object":
        raise bad_request(f"{param} must be a schema of type 'object' (the arguments are a JSON object), got type "
                          f"{clip(json.dumps(kind), 40)}", param)
    if json_depth(parameters, MAX_PARAMETERS_DEPTH) > MAX_PARAMETERS_DEPTH:
        raise bad_request(f"{param} is nested more than {MAX_PARAMETERS_DEPTH} levels deep", param)


def plan(tools: list[dict[str, Any]], tool_choice: Any, parallel: bool | None, fmt: str | None,
         flat: bool = False) -> ToolPlan:
    """The request's ``ToolPlan``; a ``tool_choice`` naming no tool (or the wrong shape) is a 400.

    ``fmt`` None (the family writes no tool calls): ``auto`` (given, or implied by tools without a tool_choice)
    answers the chat without the tools rather than refusing it. Chat frontends send their tool lists with every
    message and no tool_choice (Open WebUI: 36 built-in tools, 26k characters), and a model that was never shown
    tools in tuning can neither use them nor fit them in a small context; under ``auto`` a text answer is always
    a valid one. ``required`` and a named function still work: the grammar writes the call.
    """
    parallel = True if parallel is None else bool(parallel)
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if fmt is None:
        if choice == "auto" and tools:
            _warn_dropped(len(tools))
            return ToolPlan("text", dropped=len(tools))
        fmt = DEFAULT_FORMAT
    return _plan(tools, choice, parallel, fmt, flat)


def _warn_dropped(count: int) -> None:
    global _warned_no_format
    message = ("%d tool(s) under tool_choice auto were left out: the served family has no tool-call format (none of "
               "its chat templates renders tools), so the chat is answered as text. Set engine.tool_call_format to "
               "parse calls in one, or send tool_choice 'required' or a function (docs/frontends.md)")
    if _warned_no_format:
        logger.debug(message, count)
    else:
        _warned_no_format = True
        logger.warning(message + "; further such requests are logged at debug level", count)


def _plan(tools: list[dict[str, Any]], choice: Any, parallel: bool, fmt: str, flat: bool) -> ToolPlan:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"tool_choice {choice!r} is not supported (none, auto, required, or a function)",
                              "tool_choice")
        if choice == "none" or not tools:
            if choice == "required":
                raise bad_request("tool_choice 'required' needs tools", "tool_choice")
            return ToolPlan("text", fmt=fmt)
        return ToolPlan(choice, tools, parallel=parallel, fmt=fmt)
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name") if flat else (choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            shape = '{"type": "function", "name": ...}' if flat else '{"type": "function", "function": {"name": ...}}'
            raise bad_request(f"tool_choice must name a function: {shape}", "tool_choice")
        if name not in {t["function"]["name"] for t in tools}:
            known = ", ".join(t["function"]["name"] for t in tools) or "no tools were given"
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools ({known})", "tool_choice")
        return ToolPlan("named", tools, name=name, parallel=False, fmt=fmt)
    raise bad_request("tool_choice must be 'none', 'auto', 'required' or a function", "tool_choice")


def message_calls(calls: list[ParsedCall], fmt: str | None = None) -> list[dict[str, Any]]:
    return [{"id": new_call_id(fmt), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


@dataclass
class _StreamedCall:
    """A call being streamed: its id (sent with its name) and how its arguments are being sent."""

    index: int
    head: CallHead  # its name, and where its arguments begin
    read: Callable[[str], str]  # the answer so far -> its arguments as JSON text so far
    id: str  # in the family's shape (new_call_id)
    canonical: CanonicalJson | None = None  # arguments given as an object: sent canonically as they are written
    sent_whole: bool = False  # arguments given otherwise (a JSON-encoded string, null): sent once complete

    @property
    def whole(self) -> bool:
        """All of its arguments were sent."""
        return self.sent_whole or (self.canonical is not None and self.canonical.done)

    @property
    def writing(self) -> bool:
        """Its object of arguments is being written (neither complete nor broken)."""
        return self.canonical is not None and not (self.canonical.done or self.canonical.broken)


class ChoiceStream:
    """One streamed choice's text turned into chat deltas: content, or tool calls in OpenAI's delta shape
    (per call: ``index``, ``id``, ``type`` and ``name`` once, then ``arguments`` fragments that join to the JSON).

    Calls are streamed as they are written, as vLLM's parsers stream them: a call's name once it is complete, then
    its arguments as ``json.dumps`` writes them (``CanonicalJson``), so that the fragments join to the very string
    of the whole answer's ``tool_calls``. Under ``auto``, content streams until a call may be starting (its
    marker, or a tail that could begin one, is held back); a call is streamed once its name is one of the tools.
    What cannot be streamed (``pythonic`` calls, arguments written before the name, an unknown name) is read from
    the whole answer at the end, as before: an answer that turns out not to be calls is then sent as content.
    A call already streamed stays sent: one cut by ``max_tokens`` ends with ``finish_reason`` ``length``.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of text already sent as content
        self.holding = False  # auto: a call may have started; content is no longer sent as it comes
        self.calls: list[_StreamedCall] = []
        self.known = {t["function"]["name"] for t in plan.tools}

    @property
    def made_calls(self) -> bool:
        return bool(self.calls)

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        mode = self.plan.mode
        if mode == "auto" and not self.holding and looks_like_call_start(self.plan.fmt, self.text):
            self.holding = True
        if mode in ("named", "required") or self.holding:
            return self._call_deltas()
        held = marker_prefix_len(self.plan.fmt, self.text) if mode == "auto" else 0
        return self._content_to(len(self.text) - held)

    def finish(self) -> list[dict[str, Any]]:
        """Whatever is left once the choice ended: the rest of the calls, or held-back text as content."""
        mode = self.plan.mode
        if mode == "text" or (mode == "auto" and not self.holding):
            return self._content_to(len(self.text))
        out = self._call_deltas()
        if self.calls:
            return out
        content, calls = self.plan.calls(self.text)  # nothing streamed: the whole answer's calls, if any
        if not calls:
            return out + self._content_to(len(self.text))
        out += self._content_to(len(content or ""))  # content is the text before the calls
        for call in calls:
            state = self._start_call(CallHead(call.name, len(self.text)), out)
            out.append({"tool_calls": [{"index": state.index, "function": {"arguments": call.arguments}}]})
        return out

    def _content_to(self, end: int) -> list[dict[str, Any]]:
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return [{"content": piece}] if piece else []

    def _heads(self) -> tuple[int, list[CallHead]] | None:
        """The calls begun so far (and where the content before them ends), or None if they are read whole."""
        if self.plan.mode == "named":
            return 0, [CallHead(self.plan.name or "", 0)]
        if self.plan.mode == "required":  # the constraint's array: [{"name": ..., "parameters": {...}}, ...]
            return 0, listed_calls(self.text)
        return call_heads(self.plan.fmt, self.text)

    def _call_deltas(self) -> list[dict[str, Any]]:
        last = self.calls[-1] if self.calls else None
        if last is not None and last.writing:  # no call can begin before its arguments end: only they move
            return self._arguments(last)
        found = self._heads()
        if found is None:
            return []
        content_end, heads = found
        if not self.plan.parallel:
            heads = heads[:1]
        out: list[dict[str, Any]] = []
        for position, head in enumerate(heads):
            if position == len(self.calls):
                if head.name not in self.known:  # not a call of these tools: stream no more
                    break
                if not self.calls:
                    out += self._content_to(content_end)
                self._start_call(head, out)
            out += self._arguments(self.calls[position])
        return out

    def _start_call(self, head: CallHead, out: list[dict[str, Any]]) -> _StreamedCall:
        """A new call, its header (index, id, type, name) appended to ``out``."""
        # named and required calls are the constraint's JSON, whatever the family's format
        fmt = self.plan.fmt if self.plan.mode == "auto" else DEFAULT_FORMAT
        state = _StreamedCall(len(self.calls), head, arguments_reader(fmt, head, self.plan.tools),
                              new_call_id(self.plan.fmt))
        self.calls.append(state)
        out.append({"tool_calls": [{"index": state.index, "id": state.id, "type": "function",
                                    "function": {"name": head.name, "arguments": ""}}]})
        return state

    def _arguments(self, state: _StreamedCall) -> list[dict[str, Any]]:
        head = state.head
        raw = state.read(self.text)
        if state.canonical is None and not state.sent_whole:
            begun = raw.lstrip()
            if not begun:
                return []
            if begun[0] == "{":
                state.canonical = CanonicalJson()
            else:  # not an object: sent once whole, as the whole answer's parse writes it
                start = head.start + len(raw) - len(begun)  # (a JSON format's raw text: the answer's own)
                end = value_end(self.text, start)
                arguments = None if end is None else call_arguments(head.name, self.text[start:end])
                if arguments is None:
                    return []
                state.sent_whole = True
                return [{"tool_calls": [{"index": state.index, "function": {"arguments": arguments}}]}]
        if state.canonical is None:
            return []
        piece = state.canonical.feed(raw)
        return [{"tool_calls": [{"index": state.index, "function": {"arguments": piece}}]}] if piece else []


def finish_reason(made_calls: bool, reason: str | None) -> str | None:
    """``tool_calls`` when the answer is complete calls; a cut answer keeps ``length``."""
    return "tool_calls" if made_calls and reason == "stop" else reason


def assistant_message(plan: ToolPlan, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
    """A finished choice's ``message`` (content and/or ``tool_calls``) and its ``finish_reason``."""
    content, calls = plan.calls(text, cut=reason == "length")
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = message_calls(calls, plan.fmt)
    return message, finish_reason(bool(calls), reason)
