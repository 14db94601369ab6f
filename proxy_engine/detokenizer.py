"""Incremental detokenization with stop strings: what each step may stream, and nothing it must not.

Three rules, each a bug other OpenAI-compatible servers shipped (tests/engine/test_detokenizer.py pins them):
- a text delta never ends in an incomplete UTF-8 character (the decoder's U+FFFD is held back until the
  next token completes it);
- a stop string is never streamed in part: the longest tail of the text that could still begin a stop
  string is held back until it is ruled in or out;
- the concatenated deltas equal the decoding of all generated tokens, cut before the stop string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

REPLACEMENT = "\ufffd"
# Tokens decoded together with the new ones, so that tokenizers that drop a leading space on the first
# token of a decode (SentencePiece) see enough context.
_CONTEXT_TOKENS = 5


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's reversible map of bytes to printable characters, inverted (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """A token's raw bytes, which may be part of a UTF-8 character (OpenAI's logprobs ``bytes``).

    Byte-level BPE tokens (GPT-2, Llama 3, Qwen) map back through the byte alphabet; SentencePiece byte
    fallback tokens (``<0xE6>``) are one byte; anything else is its decoded text.
    """
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        fallback = _BYTE_FALLBACK.match(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        alphabet = _byte_level_alphabet()
        if piece and token_id not in getattr(tokenizer, "all_special_ids", []) and all(c in alphabet for c in piece):
            raw = bytes(alphabet[c] for c in piece)
            if tokenizer.decode([token_id]) == raw.decode("utf-8", errors="replace"):
                return raw
    return tokenizer.decode([token_id]).encode("utf-8")


def find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """Earliest ``(index, stop)`` of any stop string that ends after ``start``, or None."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, max(0, start - len(stop) + 1))
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


@dataclass
class StepText:
    delta: str
    stopped: bool  # a stop string matched: the sequence is finished


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into safe-to-stream text deltas."""

    def __init__(
        self, tokenizer, stops: list[str], include_stop: bool = False, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # all decoded text so far (complete characters only)
        self.sent = 0  # characters of ``text`` already streamed
        self._prefix = 0  # ids[_prefix:_read] were decoded as context for the next delta
        self._read = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int, check_stops: bool = True) -> StepText:
        """Take one generated token; return what may be streamed now (stop strings matched if ``check_stops``)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.text += after[len(before) :]
            self._prefix = max(self._prefix, len(self.ids) - _CONTEXT_TOKENS)
            self._read = len(self.ids)
        return self._release(final=False, check_stops=check_stops)

    def finish(self) -> str:
        """The sequence ended for another reason (length, EOS, abort): flush what was held back."""
        if self.stopped:
            return ""
        tail = self._decode(self.ids[self._prefix :])
        before = self._decode(self.ids[self._prefix : self._read])
        if len(tail) > len(before):  # an incomplete character at the very end: emit it as decoded
            self.text += tail[len(before) :]
            self._read = len(self.ids)
        return self._release(final=True).delta

    def _release(self, final: bool, check_stops: bool = True) -> StepText:
        if self.stopped:
            return StepText("", True)
        if self.stops and check_stops:
            match = find_stop(self.text, self.stops, self.sent)
            if match is not None:
                index, stop = match
                self.text = self.text[: index + (len(stop) if self.include_stop else 0)]
                self.stopped = True
                delta = self.text[self.sent :]
                self.sent = len(self.text)
                return StepText(delta, True)
        end = len(self.text) if final else len(self.text) - held_back(self.text[self.sent :], self.stops)
        delta = self.text[self.sent : end]
        self.sent = end
        return StepText(delta, False)
