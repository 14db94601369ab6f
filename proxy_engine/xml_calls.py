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
    if raw.lower() == "null":
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


def arguments_so_far(body: str, schemas: dict[str, Any]) -> str:
    """The arguments of a call still being written (``body``: the text after its ``<function=name>``), as JSON text
    that only ever grows as the body does, and ends in ``}`` once the function is closed.

    A finished parameter is written as ``json.dumps`` writes its value. The parameter being written is shown only
    if it is a string, opened and as far as it is settled: a tail that may begin a closing tag, and a newline that
    may be the format's own, are held back, and so is a value that may still turn out to be ``null``. Any other
    type waits until it is whole.
    """
    closed = body.find(_FUNCTION_END)
    if closed >= 0:
        body = body[:closed]
    parts = []
    for parameter in _PARAMETER.finditer(body):
        name = parameter.group(1).strip()
        key = json.dumps(name, ensure_ascii=False)
        end = _value_end(body, parameter.end())
        if end >= 0 or closed >= 0:
            written = _trimmed(body[parameter.end():len(body) if end < 0 else end])
            parts.append(f"{key}: {json.dumps(value(written, schemas.get(name)), ensure_ascii=False)}")
            continue
        if _kind(schemas.get(name)) == "string":
            written = _settled(body[parameter.end():])
            if not "null".startswith(written.lower()):
                parts.append(f"{key}: {json.dumps(written, ensure_ascii=False)[:-1]}")  # the string left open
        break
    return "{" + ", ".join(parts) + ("}" if closed >= 0 else "")


def _settled(raw: str) -> str:
    """The part of a value being written that will stay in it: without a tail that could begin a closing tag,
    the format's leading newline, or a last newline that may be the format's trailing one."""
    for length in range(min(len(raw), max(len(m) for m in _VALUE_ENDS)), 0, -1):
        if any(marker.startswith(raw[-length:]) for marker in _VALUE_ENDS):
            raw = raw[:-length]
            break
    raw = raw[1:] if raw.startswith("\n") else raw
    return raw[:-1] if raw.endswith("\n") else raw
