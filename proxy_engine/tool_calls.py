"""How a model family writes tool calls: render them into a plain transcript, and parse them out of generated text.

The formats of the common open families (``EngineConfig.tool_call_format``, detected from the chat
template when left at ``auto``; vLLM's tool-call parser names):

- ``hermes`` (Hermes, Qwen 2/2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call.
- ``llama3_json`` (Llama 3.1+): the whole answer is ``{"name": ..., "parameters": {...}}`` (after an optional
  ``<|python_tag|>``; several calls separated by ``;``).
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``, or the newer
  ``[TOOL_CALLS]name[ARGS]{...}`` per call.
- ``pythonic`` (Llama 3.2 / 3.3 / 4 with their pythonic templates, Gemma 3's tool templates): the whole answer is a
  Python list of calls with keyword arguments, ``[get_weather(city="Paris"), get_time(zone="CET")]`` (Llama 4 may
  wrap it in ``<|python_start|>`` ... ``<|python_end|>``). It is read with ``ast``, never evaluated: arguments
  must be literals.
- ``granite`` (Granite 3.x): the whole answer is a JSON list of calls, ``[{"name": ..., "arguments": {...}}]``,
  after an optional ``<|tool_call|>`` (3.0) or ``<tool_call>`` (3.1).
- ``gemma4`` (Gemma 4): ``<|tool_call>call:name{key:<|"|>text<|"|>,n:3}<tool_call|>``, bare keys and values
  (``gemma4_calls.py``).
- ``qwen3_coder`` (Qwen3-Coder, Qwen 3.5): ``<tool_call><function=name><parameter=key>value</parameter>...``,
  values read by the function's parameter schema (``xml_calls.py``).
- ``olmo3`` (OLMo 3 Instruct / Think): ``<function_calls>f(city="Paris")\ng(zone="CET")</function_calls>``,
  one Python-style call a line, each value written as JSON (``true``, ``null``) as its template writes them. Read
  with ``ast`` like ``pythonic``, never evaluated.

Pure functions, no tensors: the engine renders transcripts with them, the server parses answers with them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from proxy_engine import gemma4_calls, xml_calls
from proxy_engine.marks import held_tail

ToolCallFormat = Literal["hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder", "granite", "gemma4", "olmo3"]
FORMATS: tuple[str, ...] = ("hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder", "granite", "gemma4",
                            "olmo3")
DEFAULT_FORMAT: ToolCallFormat = "hermes"

_OLMO3_OPEN, _OLMO3_CLOSE = "<function_calls>", "</function_calls>"
# What starts a call in each format: text from here on is held back from a stream until it parses (or not).
CALL_MARKERS: dict[str, tuple[str, ...]] = {
    "hermes": ("<tool_call>",),
    "llama3_json": ("<|python_tag|>",),
    "mistral": ("[TOOL_CALLS]",),
    "pythonic": ("<|python_start|>",),
    "qwen3_coder": ("<tool_call>", "<function="),
    "granite": ("<|tool_call|>",),
    "gemma4": ("<|tool_call>",),
    "olmo3": (_OLMO3_OPEN,),
}
_GRANITE_PREFIXES = ("<|tool_call|>", "<tool_call>")  # 3.0's token, then 3.1's string
# Formats whose calls cannot be read without their marker. Some tokenizers mark it a special token (Mistral's
# [TOOL_CALLS], Gemma 4's tags, <tool_call> in some Hermes fine-tunes), which decoding skips by default: an answer
# that may hold calls is decoded with special tokens kept, as vLLM's parsers ask. The others parse without.
MARKED_FORMATS: tuple[str, ...] = ("hermes", "mistral", "qwen3_coder", "gemma4", "olmo3")
# What pythonic templates write to show the format (Llama 3.2 / 4's, vLLM's Gemma 3 example).
_PYTHONIC_EXAMPLE = re.compile(r"func_name1\(|params_name1=")
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_MISTRAL_ARGS = re.compile(r"([A-Za-z0-9_.\-]+)\[ARGS\]")


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as a string (what OpenAI's ``function.arguments`` holds)


_READS_TOOLS = re.compile(r"\btools\b")


def renders_tools(chat_template: str | None) -> bool:
    """Whether a chat template does anything with the request's ``tools`` (SmolLM2's, Llama 2's and the demo's do
    not: a family tuned without tools)."""
    return bool(chat_template and _READS_TOOLS.search(chat_template))


def detect_format(chat_template: str | None) -> ToolCallFormat:
    """The family's format, from what its chat template writes (Hermes / Qwen when nothing tells)."""
    template = chat_template or ""
    if "<function=" in template and "<parameter=" in template:
        return "qwen3_coder"
    if "<|tool_call>" in template:
        return "gemma4"
    if _OLMO3_OPEN in template:
        return "olmo3"
    if "<|tool_call|>" in template:
        return "granite"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if _PYTHONIC_EXAMPLE.search(template):
        return "pythonic"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return DEFAULT_FORMAT


def _arguments_object(arguments: Any) -> dict[str, Any]:
    """OpenAI sends ``arguments`` as a JSON string; templates and transcripts want the object."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return {"_raw": arguments}
    return arguments if isinstance(arguments, dict) else {"_value": arguments}


def render_calls(fmt: str, calls: list[dict[str, Any]]) -> str:
    """An assistant's tool calls (OpenAI's ``tool_calls`` entries) as the family writes them."""
    pairs = [(c.get("function", {}).get("name", ""), _arguments_object(c.get("function", {}).get("arguments")))
             for c in calls]
    if fmt == "llama3_json":
        return "<|python_tag|>" + "; ".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False)
                                          for n, a in pairs)
    if fmt == "mistral":
        return "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in pairs], ensure_ascii=False)
    if fmt == "pythonic":
        return "[" + ", ".join(f"{n}(" + ", ".join(f"{k}={_python_literal(v)}" for k, v in a.items()) + ")"
                               for n, a in pairs) + "]"
    if fmt == "qwen3_coder":
        return "\n".join(xml_calls.render(n, a) for n, a in pairs)
    if fmt == "gemma4":
        return "".join(gemma4_calls.render(n, a) for n, a in pairs)
    if fmt == "granite":
        return "<|tool_call|>" + json.dumps([{"name": n, "arguments": a} for n, a in pairs], ensure_ascii=False)
    if fmt == "olmo3":  # as OLMo 3's template writes earlier calls: each value as JSON
        lines = (f"{n}(" + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in a.items()) + ")"
                 for n, a in pairs)
        return _OLMO3_OPEN + "\n".join(lines) + _OLMO3_CLOSE
    return "".join(f"<tool_call>{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}</tool_call>"
                   for n, a in pairs)


def _python_literal(value: Any) -> str:
    """A JSON value as the Python literal a pythonic call writes (``True``, ``None``, ``"text"``)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_python_literal(k)}: {_python_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return repr(value)
    return json.dumps(value, ensure_ascii=False)  # a JSON string or number is a Python literal too


def tools_preamble(fmt: str, tools: list[dict[str, Any]]) -> str:
    """What a plain-text model reads about the tools, and how to call them, before the transcript."""
    listed = "\n".join(json.dumps(tool.get("function", tool), ensure_ascii=False, separators=(",", ":"))
                       for tool in tools)
    example = render_calls(fmt, [{"function": {"name": "<name>", "arguments": {"<argument>": "<value>"}}}])
    return f"You may call these tools:\n{listed}\nTo call a tool, answer with: {example}"


def template_messages(messages: list[dict[str, Any]], fmt: str = DEFAULT_FORMAT) -> list[dict[str, Any]]:
    """Messages as Hugging Face chat templates expect them: tool call arguments as objects, not strings; for the
    ``mistral`` format, call ids as Mistral's templates require them (``mistral_call_id``)."""
    ids = mistral_call_id if fmt == "mistral" else (lambda call_id: call_id)
    out = []
    for message in messages:
        if message.get("tool_calls"):
            message = dict(message)
            message["tool_calls"] = [
                {**call, "function": {**call.get("function", {}),
                                      "arguments": _arguments_object(call.get("function", {}).get("arguments"))},
                 **({"id": ids(call["id"])} if isinstance(call.get("id"), str) else {})}
                for call in message["tool_calls"]
            ]
        if isinstance(message.get("tool_call_id"), str):
            message = {**message, "tool_call_id": ids(message["tool_call_id"])}
        out.append(message)
    return out


_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def mistral_call_id(call_id: str) -> str:
    """A call id as Mistral's chat templates require it, 9 letters and digits (they raise on any other): the id's
    last 9 alphanumerics (vLLM keeps the last 9 characters), or, for an id with fewer, 9 derived from all of it.
    The same for the assistant's call and the tool result that answers it, which is what pairs them."""
    alphanumeric = re.sub(r"[^A-Za-z0-9]", "", call_id)
    if len(alphanumeric) >= 9:
        return alphanumeric[-9:]
    number = int.from_bytes(hashlib.sha256(call_id.encode("utf-8")).digest()[:8], "big")
    return "".join(_BASE62[(number // 62**k) % 62] for k in range(9))


def transcript_messages(fmt: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a plain transcript: an assistant's calls written out in its content, in the family's format."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            content = (message.get("content") or "") + render_calls(fmt, message["tool_calls"])
            message = {"role": "assistant", "content": content}
        out.append(message)
    return out


def _call(name: Any, arguments: Any) -> ParsedCall | None:
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False))


def _objects(text: str) -> list[Any] | None:
    """Every JSON value in ``text``, one after another (separated by whitespace or ``;``), or None if any fails."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    while True:
        while position < len(text) and text[position] in " \t\r\n;":
            position += 1
        if position == len(text):
            return values
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return None
        values.append(value)


def parse_calls(fmt: str, text: str, tools: list[dict[str, Any]] | None = None) -> tuple[str | None, list[ParsedCall]]:
    """``(content, calls)`` from a generated answer. Without a well-formed call, the whole text is content.
    ``tools`` (OpenAI's) type the values of ``qwen3_coder`` calls, which are written bare."""
    if fmt in ("qwen3_coder", "gemma4"):
        content, pairs = xml_calls.parse(text, tools) if fmt == "qwen3_coder" else gemma4_calls.parse(text)
        return content, [ParsedCall(name, arguments) for name, arguments in pairs]
    if fmt == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for block in _HERMES_BLOCK.findall(text[start:]):
            values = _objects(block)
            if not values or len(values) != 1 or not isinstance(values[0], dict):
                return text, []
            call = _call(values[0].get("name"), values[0].get("arguments", values[0].get("parameters")))
            if call is None:
                return text, []
            calls.append(call)
        return (text[:start] or None), calls
    if fmt == "pythonic":
        calls = _pythonic_calls(text)
        return (None, calls) if calls else (text, [])
    if fmt == "olmo3":
        start = text.find(_OLMO3_OPEN)
        end = text.find(_OLMO3_CLOSE, start)
        body = text[start + len(_OLMO3_OPEN):end if end >= 0 else len(text)] if start >= 0 else ""
        calls = _python_calls(body, json_literals=True)
        return ((text[:start] or None), calls) if calls else (text, [])
    if fmt == "granite":
        values = _objects(text[_granite_body(text):])
        items = values[0] if values and len(values) == 1 and isinstance(values[0], list) else None
        calls = [_call(v.get("name"), v.get("arguments", v.get("parameters"))) if isinstance(v, dict) else None
                 for v in items or []]
        if not calls or any(c is None for c in calls):
            return text, []
        return None, [c for c in calls if c is not None]
    if fmt == "mistral":
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return text, []
        body = text[start + len("[TOOL_CALLS]"):]
        calls = _mistral_calls(body)
        return ((text[:start] or None), calls) if calls else (text, [])
    # llama3_json: the answer is the call(s), optionally after <|python_tag|>.
    stripped = text.strip()
    tagged = stripped.startswith("<|python_tag|>")
    body = stripped[len("<|python_tag|>"):] if tagged else stripped
    if not body.startswith("{"):
        return text, []
    values = _objects(body)
    if not values or not all(isinstance(v, dict) for v in values):
        return text, []
    calls = [_call(v.get("name"), v.get("parameters", v.get("arguments"))) for v in values]
    if any(c is None for c in calls):
        return text, []
    return None, [c for c in calls if c is not None]


def _mistral_calls(body: str) -> list[ParsedCall]:
    named = _MISTRAL_ARGS.match(body.lstrip())
    if named:  # name[ARGS]{...} (repeated, each after its own [TOOL_CALLS])
        calls = []
        for chunk in body.split("[TOOL_CALLS]"):
            match = _MISTRAL_ARGS.match(chunk.lstrip())
            values = _objects(chunk.lstrip()[match.end():]) if match else None
            if not match or not values or len(values) != 1:
                return []
            call = _call(match.group(1), values[0])
            if call is None:
                return []
            calls.append(call)
        return calls
    values = _objects(body)
    if not values or len(values) != 1:
        return []
    items = values[0] if isinstance(values[0], list) else [values[0]]
    calls = [_call(v.get("name"), v.get("arguments", v.get("parameters"))) if isinstance(v, dict) else None
             for v in items]
    return [] if any(c is None for c in calls) or not calls else [c for c in calls if c is not None]


def _pythonic_calls(text: str) -> list[ParsedCall]:
    """The calls of an answer that is wholly a Python list of calls with literal keyword arguments (none else)."""
    body = text.strip()
    if body.startswith("<|python_start|>"):
        body = body[len("<|python_start|>"):].removesuffix("<|python_end|>").strip()
    if not body.startswith("["):
        return []
    return _python_calls(body)


_JSON_LITERALS = {"true": True, "false": False, "null": None}


class _JsonLiterals(ast.NodeTransformer):
    """``true``, ``false`` and ``null`` written as values (OLMo 3 writes each value as JSON) read as literals."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Constant(_JSON_LITERALS[node.id]) if node.id in _JSON_LITERALS else node


def _python_calls(body: str, json_literals: bool = False) -> list[ParsedCall]:
    """Calls with literal keyword arguments: a Python list of them, or (``json_literals``: OLMo 3's) one statement
    each, a line apiece, whose values may also be JSON's ``true`` / ``false`` / ``null``. None else."""
    try:
        tree = ast.parse(body.strip(), mode="exec")
    except (SyntaxError, ValueError, RecursionError):
        return []
    statements = [node.value for node in tree.body if isinstance(node, ast.Expr)]
    if len(statements) != len(tree.body) or not statements:
        return []
    if len(statements) == 1 and isinstance(statements[0], ast.List):
        statements = statements[0].elts
    elif not json_literals:  # the pythonic format is one list
        return []
    calls = []
    for node in statements:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return []
        try:  # literal_eval: values only, nothing runs
            values = [_JsonLiterals().visit(kw.value) if json_literals else kw.value for kw in node.keywords]
            arguments = {kw.arg: ast.literal_eval(value) for kw, value in zip(node.keywords, values)
                         if kw.arg is not None}
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return []
        if len(arguments) != len(node.keywords):  # a **mapping: not a literal call
            return []
        try:
            call = _call(node.func.id, arguments)  # the formats' one way to a ParsedCall
        except (TypeError, ValueError):  # a set, bytes or a complex number: no JSON for it
            return []
        if call is None:
            return []
        calls.append(call)
    return calls


@dataclass(frozen=True)
class CallHead:
    """A call whose name is written: its arguments begin at ``start`` in the answer (and may not be complete)."""

    name: str
    start: int


# A call object as the JSON formats write it, up to its arguments: the name must come first to be streamed.
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"([A-Za-z0-9_.\-]{1,64})"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_SPACE = re.compile(r"\s*")
_LIST_OPEN = re.compile(r"\s*\[")


def call_heads(fmt: str, text: str) -> tuple[int, list[CallHead]] | None:
    """The calls begun so far in an answer still being written: where the content before them ends, and each call
    whose name is known. None for ``pythonic`` and ``olmo3``, whose arguments are Python, not JSON, and are read
    whole.

    A call written in another order (its arguments before its name) is not listed, nor any after it: those are
    read from the whole answer (``parse_calls``).
    """
    heads: list[CallHead] = []
    if fmt in ("pythonic", "olmo3"):
        return None
    if fmt == "qwen3_coder":  # tags, not JSON: a call's arguments begin after its <function=name>
        start = xml_calls.start(text)
        if start < 0:
            return len(text), heads
        heads += [CallHead(f.group(1).strip(), f.end()) for f in xml_calls.FUNCTION.finditer(text, start)]
        return start, heads
    if fmt == "gemma4":  # a call's arguments begin at the { after its call:name
        start = text.find(gemma4_calls.START)
        if start < 0:
            return len(text), heads
        heads += [CallHead(c.group(1), c.end()) for c in gemma4_calls.CALL.finditer(text, start)]
        return start, heads
    if fmt == "granite":
        return 0, listed_calls(text, _granite_body(text))
    if fmt == "llama3_json":
        body = _SPACE.match(text).end()
        if text.startswith("<|python_tag|>", body):
            body += len("<|python_tag|>")
        object_calls(text, body, ";", heads)
        return 0, heads
    marker = CALL_MARKERS[fmt][0]
    start = text.find(marker)
    if start < 0:
        return len(text), heads
    position: int | None = start
    while position is not None and position >= 0:
        after = _SPACE.match(text, position + len(marker)).end()
        if fmt == "hermes":
            position = object_calls(text, after, "", heads, limit=1)
        elif text.startswith("[", after):  # mistral: [TOOL_CALLS][{...}, {...}]
            heads += listed_calls(text, after)
            break
        else:  # mistral: [TOOL_CALLS]name[ARGS]{...}
            named = _MISTRAL_ARGS.match(text, after)
            if named is None:
                break
            heads.append(CallHead(named.group(1), named.end()))
            position = value_end(text, named.end())
        if position is not None:
            position = text.find(marker, position)
    return start, heads


def arguments_reader(fmt: str, head: CallHead, tools: list[dict[str, Any]] | None = None) -> Callable[[str], str]:
    """A reader of the call's arguments as written so far, given the answer so far: JSON text that only grows (to
    feed ``CanonicalJson``). The JSON formats' is the answer's own text; ``qwen3_coder``'s is built from the tags,
    reading only what is new each time."""
    if fmt == "qwen3_coder":
        reader = xml_calls.XmlArguments(xml_calls.properties(tools, head.name))
        return lambda text: reader.feed(text[head.start:])
    if fmt == "gemma4":
        translator = gemma4_calls.Gemma4Arguments()
        return lambda text: translator.feed(text[head.start:])
    return lambda text: text[head.start:]


def listed_calls(text: str, position: int = 0) -> list[CallHead]:
    """The heads of a JSON list of call objects opening at ``position`` (after white space): Granite's answer,
    Mistral's ``[TOOL_CALLS][...]``, the ``required`` constraint's array."""
    heads: list[CallHead] = []
    opening = _LIST_OPEN.match(text, position)
    if opening:
        object_calls(text, opening.end(), ",", heads)
    return heads


def object_calls(text: str, position: int, separators: str, heads: list[CallHead], limit: int | None = None
                 ) -> int | None:
    """Read call objects (``{"name": ..., "arguments": ...}``) from ``position``, separated by whitespace and
    ``separators``, appending their heads: at most ``limit`` of them. Returns where the last one ended, or None
    when the text ran out (or stopped being calls) first."""
    read = 0
    while limit is None or read < limit:
        while position < len(text) and (text[position].isspace() or text[position] in separators):
            position += 1
        head = _CALL_HEAD.match(text, position)
        if head is None:
            return None
        heads.append(CallHead(head.group(1), head.end()))
        end = value_end(text, head.end())
        if end is None:
            return None
        position = _SPACE.match(text, end).end()
        if not text.startswith("}", position):
            return None
        position += 1
        read += 1
    return position


def value_end(text: str, position: int) -> int | None:
    """Where the JSON value at ``position`` ends, or None while it is incomplete (or not JSON)."""
    try:
        return json.JSONDecoder().raw_decode(text, position)[1]
    except json.JSONDecodeError:
        return None


def call_arguments(name: str, raw: str) -> str | None:
    """A call's arguments given as a complete JSON value (an object, a JSON-encoded string, ``null``), as
    ``ParsedCall.arguments`` holds them; None when they are not (yet) such a value."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    call = _call(name, value)
    return None if call is None else call.arguments


def _granite_body(text: str) -> int:
    """Where a Granite answer's list of calls would begin: past white space and its optional prefixes."""
    position = _SPACE.match(text).end()
    for prefix in _GRANITE_PREFIXES:
        if text.startswith(prefix, position):
            position = _SPACE.match(text, position + len(prefix)).end()
    return position


def looks_like_call_start(fmt: str, text: str) -> bool:
    """Whether a stream must hold ``text`` back: a call may be starting (llama3_json: the answer opens an object)."""
    if (fmt == "llama3_json" and text.lstrip().startswith("{")) or (
            fmt in ("pythonic", "granite") and text.lstrip().startswith("[")):
        return True
    if fmt == "granite" and text.lstrip().startswith("<tool_call>"):
        return True
    return any(marker in text for marker in CALL_MARKERS[fmt])


def marker_prefix_len(fmt: str, text: str) -> int:
    """Length of the longest tail of ``text`` that could be the start of a call marker (held back while streaming)."""
    return held_tail(text, CALL_MARKERS[fmt])


def system_tools_preamble(fmt: str, tools: list[dict[str, Any]]) -> str:
    """The tools as Hermes-style chat templates write them into the system message: their definitions inside
    ``<tools></tools>``, one JSON object a line, then how to call one in the family's format."""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    example = render_calls(fmt, [{"function": {"name": "<function-name>", "arguments": {"<argument>": "<value>"}}}])
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>"
        f"\n\nFor each function call, answer with the function's name and arguments like this:\n{example}"
    )


def messages_with_tools_preamble(fmt: str, messages: list[dict[str, Any]],
                                 tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a chat template that ignores ``tools``: the preamble closes the system message (or is one),
    and an assistant's earlier calls are written out in its content, since such a template ignores those too."""
    preamble = system_tools_preamble(fmt, tools)
    messages = transcript_messages(fmt, messages)
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        return [{**first, "content": f"{first.get('content') or ''}\n\n{preamble}"}, *messages[1:]]
    return [{"role": "system", "content": preamble}, *messages]
