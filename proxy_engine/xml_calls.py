"""The XML tool-call format of Qwen3-Coder and the Qwen 3.5 templates (vLLM's ``qwen3_coder`` parser):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

A parameter's value is written bare, one newline either side (those are not part of it): a string as it is, any
other value as JSON. So reading it back needs the function's parameter schema: ``days`` is the number 3 if its
schema says ``integer`` and the string "3" if it says ``string`` or nothing (as vLLM reads it). ``null`` is None
whatever the type.

Pure functions, no tensors: ``tool_calls.py`` dispatches to them for this format.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

from proxy_engine.marks import held_tail

FUNCTION = re.compile(r"<function=([^>\n]*)>")
_PARAMETER = re.compile(r"<parameter=([^>\n]*)>")
_FUNCTION_END = "</function>"
_VALUE_ENDS = ("</parameter>", "<parameter=", _FUNCTION_END)  # what ends a value (a closing tag may be skipped)


def render(name: str, arguments: dict[str, Any]) -> str:
    """One call as the format writes it (as Qwen3-Coder's chat template writes an earlier turn's calls)."""
    parameters = "".join(
        f"<parameter={key}>\n{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}\n"
        "</parameter>\n" for key, value in arguments.items())
    return f"<tool_call>\n<function={name}>\n{parameters}{_FUNCTION_END}\n</tool_call>"


def properties(tools: list[dict[str, Any]] | None, name: str) -> dict[str, Any]:
    """The named function's parameter schemas by parameter name (empty when unknown)."""
    for tool in tools or []:
        function = tool.get("function", tool)
        if function.get("name") == name:
            schema = function.get("parameters") or {}
            found = schema.get("properties") if isinstance(schema, dict) else None
            return found if isinstance(found, dict) else {}
    return {}


def start(text: str) -> int:
    """Where the calls begin (their ``<tool_call>``, or a bare ``<function=``), or -1."""
    found = [i for i in (text.find("<tool_call>"), text.find("<function=")) if i >= 0]
    return min(found) if found else -1


def parse(text: str, tools: list[dict[str, Any]] | None) -> tuple[str | None, list[tuple[str, str]]]:
    """``(content, [(name, arguments JSON)])`` of a whole answer; every call must be closed (a call cut short by
    ``max_tokens`` leaves the whole answer text, as in the JSON formats)."""
    begin = start(text)
    if begin < 0:
        return text, []
    calls = []
    for function in FUNCTION.finditer(text, begin):
        end = text.find(_FUNCTION_END, function.end())
        if end < 0:
            return text, []
        name = function.group(1).strip()
        arguments = _parameters(text[function.end():end], properties(tools, name))
        calls.append((name, json.dumps(arguments, ensure_ascii=False)))
    return (text[:begin] or None, calls) if calls else (text, [])


def _parameters(body: str, schemas: dict[str, Any]) -> dict[str, Any]:
    found = {}
    for parameter in _PARAMETER.finditer(body):
        name = parameter.group(1).strip()
        end = _value_end(body, parameter.end())
        found[name] = value(_trimmed(body[parameter.end():len(body) if end < 0 else end]), schemas.get(name))
    return found


def _value_end(body: str, position: int) -> int:
    ends = [i for i in (body.find(marker, position) for marker in _VALUE_ENDS) if i >= 0]
    return min(ends) if ends else -1


def _trimmed(raw: str) -> str:
    """A value without the newline the format writes on either side of it."""
    raw = raw[1:] if raw.startswith("\n") else raw
    return raw[:-1] if raw.endswith("\n") else raw


def _kind(schema: Any) -> str:
    """The JSON type a parameter's schema names (the first besides null), ``string`` when it names none."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    return kind if isinstance(kind, str) else "string"


def value(raw: str, schema: Any) -> Any:
    """A parameter's value read by its schema's type; one that does not read as that type stays a string."""
    if len(raw) == 4 and raw.lower() == "null":
        return None
    kind = _kind(schema)
    if kind == "string":
        return raw
    if kind == "boolean":
        return raw.strip().lower() == "true"
    if kind in ("integer", "number"):
        try:
            number = float(raw) if kind == "number" else int(raw)
        except ValueError:
            return raw
        if isinstance(number, float):
            if not math.isfinite(number):
                return raw
            return int(number) if number.is_integer() else number
        return number
    try:  # an object, an array, or a type this reader does not know: JSON, else a Python literal, else text
        return json.loads(raw)
    except ValueError:
        pass
    try:
        literal = ast.literal_eval(raw.strip())
        json.dumps(literal)  # a set or bytes has no JSON
        return literal
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return raw


class XmlArguments:
    """The arguments of a call still being written, fed its body as it grows (the text after its
    ``<function=name>``), as JSON text that only ever grows as the body does and ends in ``}`` once the function is
    closed; each feed reads only what is new.

    A finished parameter is written as ``json.dumps`` writes its value. The parameter being written is shown only
    if it is a string, opened and as far as it is settled: a tail that may begin a closing tag, and a newline that
    may be the format's own, are held back, and so is a value that may still turn out to be ``null``. Any other
    type waits until it is whole.
    """

    def __init__(self, schemas: dict[str, Any]) -> None:
        self.schemas = schemas
        self.finished: list[str] = []  # '"key": value' of each finished parameter
        self.scanned = 0  # where the next parameter is looked for
        self.current: tuple[str, int] | None = None  # the parameter being written: its name, where its value starts
        self.searched = 0  # up to here, the current value has no end
        self.escaped = ""  # the current (string) value's settled text, escaped as json.dumps escapes it
        self.escaped_to = -1  # where in the body that text ends (-1: nothing escaped yet)
        self.closed = False

    def feed(self, body: str) -> str:
        self._read(body)
        parts = ", ".join(self.finished)
        current = None if self.closed else self._current(body)
        if current is not None:
            parts = f"{parts}, {current}" if parts else current
        return "{" + parts + ("}" if self.closed else "")

    def _read(self, body: str) -> None:
        """Finish every parameter whose value has ended; notice the function's end."""
        while not self.closed:
            if self.current is None:
                found = _PARAMETER.search(body, self.scanned)
                closed = body.find(_FUNCTION_END, self.scanned)
                if closed >= 0 and (found is None or found.start() > closed):
                    self.closed = True
                if found is None or self.closed:
                    return
                self.current, self.searched = (found.group(1).strip(), found.end()), found.end()
                self.escaped, self.escaped_to = "", -1
            name, start = self.current
            longest = max(len(marker) for marker in _VALUE_ENDS)
            end = _value_end(body, max(start, self.searched - longest + 1))  # a marker may straddle two reads
            if end < 0:
                self.searched = len(body)
                return
            written = _trimmed(body[start:end])
            key = json.dumps(name, ensure_ascii=False)
            self.finished.append(f"{key}: {json.dumps(value(written, self.schemas.get(name)), ensure_ascii=False)}")
            self.current, self.scanned = None, end

    def _current(self, body: str) -> str | None:
        """The open string parameter as JSON so far (``"key": "settled``), or None while nothing of it is shown."""
        if self.current is None:
            return None
        name, start = self.current
        if _kind(self.schemas.get(name)) != "string":
            return None
        end = len(body) - held_tail(body, _VALUE_ENDS, start)  # a tail that may begin a closing tag
        lead = start + 1 if end > start and body[start] == "\n" else start  # the format's newline
        if end > lead and body[end - 1] == "\n":
            end -= 1  # it may be the format's trailing newline
        if end - lead <= 4 and "null".startswith(body[lead:end].lower()):
            return None  # it may be null
        if self.escaped_to < 0:
            self.escaped_to = lead
        if end > self.escaped_to:  # json escapes character by character: the pieces join to the whole's escape
            self.escaped += json.dumps(body[self.escaped_to:end], ensure_ascii=False)[1:-1]
            self.escaped_to = end
        return f'{json.dumps(name, ensure_ascii=False)}: "{self.escaped}'
