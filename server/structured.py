"""Request fields that constrain the output, to the engine's ``StructuredOutput``.

OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``) and vLLM's ``structured_outputs``
(``json``, ``regex``, ``choice``, ``grammar``, ``json_object``) with its older ``guided_json`` /
``guided_regex`` / ``guided_choice`` / ``guided_grammar`` spellings. At most one constraint per request: two
are a 400, since the engine could honour only one of them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from proxy_engine.grammar import StructuredOutput
from server.errors import bad_request

# vLLM's structured_outputs keys -> our kinds. Its backend and whitespace hints are accepted and ignored (one
# engine here, and the output is valid either way); a structural_tag, a constraint of its own, is refused (400).
_VLLM_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
_VLLM_HINTS = {"backend", "disable_fallback", "disable_any_whitespace", "disable_additional_properties",
               "whitespace_pattern"}
_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def _schema(value: Any, param: str) -> Any:
    """A JSON schema given as an object, or as a string holding one (vLLM's clients send both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise bad_request(f"{param} is not valid JSON: {error.msg}", param) from None
        except RecursionError:  # nested past the parser's recursion limit: far past MAX_SPEC_DEPTH anyway
            raise bad_request(f"{param} is nested too deeply", param) from None
    if not isinstance(value, (dict, bool)):
        raise bad_request(f"{param} must be a JSON schema object", param)
    return value


def from_response_format(value: Any) -> StructuredOutput | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("response_format must be an object with a 'type'", "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema must be an object with 'name' and 'schema'",
                              "response_format.json_schema")
        if "schema" not in spec:
            raise bad_request("response_format.json_schema.schema is required", "response_format.json_schema.schema")
        return StructuredOutput("json_schema", _schema(spec["schema"], "response_format.json_schema.schema"))
    raise bad_request(
        f"response_format.type {kind!r} is not supported (use text, json_object or json_schema)",
        "response_format.type",
    )


def from_vllm(structured_outputs: Any, guided: dict[str, Any]) -> list[tuple[str, StructuredOutput]]:
    """``(param, constraint)`` for every constraint given in vLLM's spellings."""
    found: list[tuple[str, StructuredOutput]] = []
    if structured_outputs is not None:
        if not isinstance(structured_outputs, dict):
            raise bad_request("structured_outputs must be an object", "structured_outputs")
        for key, value in structured_outputs.items():
            param = f"structured_outputs.{key}"
            if value is None or value is False or key in _VLLM_HINTS:
                continue
            if key == "json_object":
                found.append((param, StructuredOutput("json_object")))
            elif key in _VLLM_KEYS:
                kind = _VLLM_KEYS[key]
                found.append((param, StructuredOutput(kind, _schema(value, param) if kind == "json_schema" else value)))
            else:
                raise bad_request(f"{param} is not supported (use json, regex, choice, grammar or json_object)", param)
    for field, kind in _GUIDED.items():
        value = guided.get(field)
        if value is not None:
            found.append((field, StructuredOutput(kind, _schema(value, field) if kind == "json_schema" else value)))
    return found


def resolve(response_format: Any, structured_outputs: Any, guided: dict[str, Any]) -> StructuredOutput | None:
    """The request's one constraint (or None); two of them are a 400 naming both."""
    found = from_vllm(structured_outputs, guided)
    openai = from_response_format(response_format)
    if openai is not None:
        found.insert(0, ("response_format", openai))
    if len(found) > 1:
        names = " and ".join(param for param, _ in found[:2])
        raise bad_request(f"give one output constraint, not several ({names})", found[1][0])
    if not found:
        return None
    param, spec = found[0]
    try:
        spec.validate()
    except ValueError as error:
        raise bad_request(f"{param}: {error}", param) from None
    return dataclasses.replace(spec, param=param)  # what a constraint that does not compile names
