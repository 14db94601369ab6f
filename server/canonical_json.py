"""One JSON value, written as ``json.dumps(value, ensure_ascii=False)`` writes it, a settled prefix at a time.

A streamed tool call's ``arguments`` fragments must join to the very string the whole answer carries, and the
whole answer carries ``json.dumps`` of the parsed arguments (a model's own spacing and escapes are its choice,
not the client's concern). So the streamed fragments are the canonical form of what the model has written so
far, up to the last token that can no longer change:

    canonical = CanonicalJson()
    canonical.feed('{"city":"Par')     # -> '{"city": "Par'
    canonical.feed('{"city":"Paris"}') # -> 'is"}'; canonical.done, canonical.end == 16

``feed`` takes the whole text written since the value began (it grows; only the new part is read) and returns
the canonical text that became settled. Held back until settled: a number or literal until a character ends it,
an escape until it is whole, a high surrogate until its low half is read (json writes the pair as one
character). Whitespace between tokens is dropped and ``,`` / ``:`` are written ``", "`` / ``": "``, as json's
default separators. Text that is not JSON stops the output for good (``broken``); the whole answer's parse
refuses it too. Structure is not checked beyond balanced brackets: that is the final parse's job.
"""

from __future__ import annotations

import json
import re

_WHITESPACE = re.compile(r"[ \t\r\n]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_SO_FAR = re.compile(r"-?[0-9]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?")  # a number more text may complete
# json.loads also reads NaN and the infinities (and json.dumps writes them back): the whole answer keeps them.
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")
_LONGEST_LITERAL = max(map(len, _LITERALS))
# A string's settled content: plain characters and whole escapes (a \u escape is whole at four hex digits).
_STRING_RUN = re.compile(r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_HIGH_SURROGATE_TAIL = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}$")
_ESCAPE_START = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?$")  # an escape that more text may complete
_PUNCTUATION = {"{": "{", "}": "}", "[": "[", "]": "]", ",": ", ", ":": ": "}


class CanonicalJson:
    """The canonical text of one JSON value being written (see the module's docstring)."""

    def __init__(self) -> None:
        self.end = 0  # characters of the raw text read (settled)
        self.depth = 0  # open objects and arrays
        self.in_string = False
        self.started = False  # a token of the value was read
        self.done = False  # the value is complete: ``end`` is where it ends in the raw text
        self.broken = False  # the text is not JSON: nothing more is written

    def feed(self, raw: str) -> str:
        out: list[str] = []
        while not (self.done or self.broken) and self.end < len(raw):
            if self.in_string:
                if not self._string(raw, out):
                    break
                continue
            self.end = _WHITESPACE.match(raw, self.end).end()
            if self.end >= len(raw):
                break
            char = raw[self.end]
            if char in _PUNCTUATION:
                self._punctuation(char, out)
            elif char == '"':
                self.in_string, self.started = True, True
                out.append('"')
                self.end += 1
            elif not self._scalar(raw, out):
                break
        return "".join(out)

    def _punctuation(self, char: str, out: list[str]) -> None:
        if char in "{[":
            self.depth += 1
        elif char in "}]":
            if self.depth == 0:
                self.broken = True
                return
            self.depth -= 1
        elif self.depth == 0:  # a separator outside any object or array
            self.broken = True
            return
        self.started = True
        out.append(_PUNCTUATION[char])
        self.end += 1
        self.done = self.depth == 0

    def _string(self, raw: str, out: list[str]) -> bool:
        """Read string content; False when more text is needed."""
        run_end = _STRING_RUN.match(raw, self.end).end()
        closed = run_end < len(raw) and raw[run_end] == '"'
        high = None
        if not closed:
            high = _HIGH_SURROGATE_TAIL.search(raw, self.end, run_end)
            if high:  # its low half may follow
                run_end = high.start()
        if run_end > self.end:
            out.append(json.dumps(json.loads(f'"{raw[self.end:run_end]}"'), ensure_ascii=False)[1:-1])
            self.end = run_end
        if closed:
            out.append('"')
            self.end += 1
            self.in_string = False
            self.done = self.depth == 0
            return True
        if run_end == len(raw) or (high and run_end == high.start()) or _ESCAPE_START.match(raw, run_end):
            return False
        self.broken = True  # a bad escape or a raw control character: json.loads refuses it
        return False

    def _scalar(self, raw: str, out: list[str]) -> bool:
        """Read a number or literal; False when more text is needed (or none fits)."""
        if _NUMBER_SO_FAR.match(raw, self.end).end() == len(raw):  # more digits may follow
            return False
        number = _NUMBER.match(raw, self.end)
        if number and number.end() > self.end:
            token = number.group()
            out.append(json.dumps(json.loads(token)))
        else:
            tail = raw[self.end:self.end + _LONGEST_LITERAL]
            token = next((word for word in _LITERALS if tail.startswith(word)), "")
            if not token:
                if not any(word.startswith(tail) for word in _LITERALS):
                    self.broken = True
                return False
            out.append(token)
        self.started = True
        self.end += len(token)
        self.done = self.depth == 0
        return True
