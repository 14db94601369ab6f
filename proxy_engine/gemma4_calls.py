"""Gemma 4's tool-call format (vLLM's ``gemma4`` parser): not JSON, though close to it.

    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3,units:[<|"|>c<|"|>]}<tool_call|>

Keys are bare, strings sit between ``<|"|>`` marks (special tokens, as are the call's tags), objects and arrays
nest as in JSON, and any other value is bare: ``true``, ``false``, ``null`` (``none`` and ``nil`` too), a number
(a float when it has a point, else an integer), or, failing those, a string. Several calls follow one another.

``Gemma4Arguments`` translates a call's ``{...}`` into JSON text as it is written, a settled token at a time, so
that the text only ever grows (a string as its characters come, a bare value once something ends it): streamed
through ``CanonicalJson`` it joins to ``json.dumps`` of the whole call's arguments, which are read with the same
translation. Pure functions, no tensors.
"""

from __future__ import annotations

import json
import re
from typing import Any

from proxy_engine.marks import held_tail

START, END, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
CALL = re.compile(r"<\|tool_call>\s*call:([\w\-.]+)\s*(?=\{)")
_BARE_END = re.compile(r"[,}\]]")


def render(name: str, arguments: dict[str, Any]) -> str:
    """One call as Gemma 4 writes it (as its chat template writes an earlier turn's calls)."""
    return f"{START}call:{name}{_value_text(arguments)}{END}"


def _value_text(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_value_text(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_value_text(item) for item in value) + "]"
    if isinstance(value, str):
        return f"{QUOTE}{value}{QUOTE}"
    return json.dumps(value)  # a number, true, false or null: bare


def bare_value(token: str) -> Any:
    """A bare value as vLLM reads it."""
    if token in ("true", "false"):
        return token == "true"
    if token.lower() in ("null", "none", "nil"):
        return None
    try:
        return float(token) if "." in token else int(token)
    except ValueError:
        return token


def parse(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """``(content, [(name, arguments JSON)])`` of a whole answer; every call's arguments must be complete (a call
    cut short by ``max_tokens`` leaves the whole answer text, as in the other formats)."""
    begin = text.find(START)
    if begin < 0:
        return text, []
    calls = []
    for call in CALL.finditer(text, begin):
        reader = Gemma4Arguments()
        translated = reader.feed(text[call.end():])
        if not reader.done:
            return text, []
        arguments = json.loads(translated)
        calls.append((call.group(1), json.dumps(arguments, ensure_ascii=False)))
    if len(calls) != text.count(START, begin):  # a call not written as call:name{...}
        return text, []
    return text[:begin] or None, calls


class Gemma4Arguments:
    """A call's ``{...}`` arguments, fed as they grow (the text from the ``{`` on), translated into JSON text that
    only grows. ``done`` once the outer object closes; ``broken`` when the text is not this format."""

    def __init__(self) -> None:
        self.position = 0
        self.pieces: list[str] = []
        self.stack: list[str] = []  # "{" or "[" for each open container
        self.state = "start"  # start, key, key_text, colon, value, bare, string, after
        self.token_start = 0  # where the key or bare value being read began
        self.string_is_key = False
        self.done = False
        self.broken = False

    def feed(self, text: str) -> str:
        while not (self.done or self.broken) and self.position < len(text):
            if not self._step(text):
                break
        return "".join(self.pieces)

    def _step(self, text: str) -> bool:
        """Read one token (or part of a string); False when more text is needed."""
        i, state = self.position, self.state
        if state == "string":
            return self._string(text)
        if state == "key_text":
            colon = text.find(":", i)
            if colon < 0:
                return False
            self._emit(json.dumps(text[self.token_start:colon].strip(), ensure_ascii=False) + ":", colon + 1, "value")
            return True
        if state == "bare":
            end = _BARE_END.search(text, i)
            if end is None:
                return False
            self._emit(json.dumps(bare_value(text[self.token_start:end.start()].strip()), ensure_ascii=False),
                       end.start(), "after")
            return True
        char = text[i]
        if char.isspace():
            self.position += 1
            return True
        if state == "start":
            return self._open(char) if char == "{" else self._break()
        if state in ("key", "value") and text.startswith(QUOTE, i):
            self.string_is_key = state == "key"
            self._emit('"', i + len(QUOTE), "string")
            return True
        if state in ("key", "value") and QUOTE.startswith(text[i:]):
            return False  # a quote mark may be arriving
        if state == "key":
            if char == "}":
                return self._close(char)
            self.state, self.token_start = "key_text", i
            return True
        if state == "colon":
            if char != ":":
                return self._break()
            self._emit(":", i + 1, "value")
            return True
        if state == "value":
            if char in "{[":
                return self._open(char)
            if char == "]" and self.stack[-1:] == ["["]:  # an empty array
                return self._close(char)
            self.state, self.token_start = "bare", i
            return True
        # after a value
        if char == ",":
            self._emit(",", i + 1, "key" if self.stack[-1] == "{" else "value")
            return True
        if char in "}]":
            return self._close(char)
        return self._break()

    def _string(self, text: str) -> bool:
        i = self.position
        end = text.find(QUOTE, i)
        if end < 0:
            settled = len(text) - held_tail(text, (QUOTE,), i)
            if settled > i:
                self._emit(json.dumps(text[i:settled], ensure_ascii=False)[1:-1], settled, "string")
            return False
        self._emit(json.dumps(text[i:end], ensure_ascii=False)[1:-1] + '"', end + len(QUOTE),
                   "colon" if self.string_is_key else "after")
        return True

    def _open(self, char: str) -> bool:
        self.stack.append(char)
        self._emit(char, self.position + 1, "key" if char == "{" else "value")
        return True

    def _close(self, char: str) -> bool:
        if not self.stack or {"{": "}", "[": "]"}[self.stack[-1]] != char:
            return self._break()
        self.stack.pop()
        self._emit(char, self.position + 1, "after")
        self.done = not self.stack
        return True

    def _emit(self, piece: str, position: int, state: str) -> None:
        self.pieces.append(piece)
        self.position, self.state = position, state

    def _break(self) -> bool:
        self.broken = True
        return False
