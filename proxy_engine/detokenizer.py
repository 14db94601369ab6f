"""Incremental detokenization with stop strings: what each step may stream, and nothing it must not.

Three rules, each a bug other OpenAI-compatible servers shipped (tests/engine/test_detokenizer.py pins them):
- a text delta never ends in an incomplete UTF-8 character (the decoder's U+FFFD is held back until the
  next token completes it);
- a stop string is never streamed in part: the longest tail of the text that could still begin a stop
  string is held back until it is ruled in or out;
- the concatenated deltas equal the decoding of all generated tokens, cut before the stop string.

The text rule (docs/text.md): a completion's text is ``decode(prompt + output) - decode(prompt)``, never
``decode(output)``. Each step decodes a short window that reaches back into the prompt, so a SentencePiece
tokenizer (whose decoder strips one leading space from whatever it decodes alone) keeps the space before the
first generated word. A SentencePiece byte-fallback token (``<0xE6>``) commits no text until a token that is not
a byte follows it: the decoder turns a whole run of bytes into U+FFFD as soon as one of them is invalid, so a
character that decoded fine could still become U+FFFD (the full decode must win).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import TypeVar

T = TypeVar("T")

REPLACEMENT = "\ufffd"
# Tokens decoded together with the new ones, so that tokenizers that drop a leading space on the first
# token of a decode (SentencePiece) see enough context; the window reaches further back while it decodes to
# nothing (special tokens), up to _MAX_CONTEXT_TOKENS.
_CONTEXT_TOKENS = 5
_MAX_CONTEXT_TOKENS = 64


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


# Every pattern transformers' clean_up_tokenization rewrites: a tokenizer whose decode leaves this text alone does
# no clean-up, so its Rust backend's decode is the same call.
_CLEAN_UP_PROBE = "a . b ? c ! d , e ' f n't g 'm h 's i 've j 're k"


def backend_decode(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=...)``, straight to the ``tokenizers`` backend where that is the
    same call: 1.4 against 4.1 us per short window (transformers converts and re-checks its arguments on every
    call), and the detokenizer makes two a token for every stream (10.5 -> 5.5 us per token in all).

    The same call means: transformers' own ``decode`` / ``_decode`` (no model-specific override) over a backend,
    and no clean-up of the decoded text, checked by behaviour on a probe (whether clean-up applies has changed
    between transformers versions). Anything else keeps ``tokenizer.decode``. Decided once per tokenizer.
    """
    if _kept_on(tokenizer, "_proxy_serve_backend_decode", lambda: _decodes_through_backend(tokenizer)):
        return partial(tokenizer._tokenizer.decode, skip_special_tokens=skip_special_tokens)
    return partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)


def _decodes_through_backend(tokenizer) -> bool:
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: keep its decode
        return False
    cls = type(tokenizer)
    if not (isinstance(tokenizer, TokenizersBackend) and cls.decode is PreTrainedTokenizerBase.decode
            and cls._decode is TokenizersBackend._decode and hasattr(tokenizer, "_tokenizer")):
        return False
    probe = tokenizer.encode(_CLEAN_UP_PROBE, add_special_tokens=False)
    return all(tokenizer.decode(probe, skip_special_tokens=skip) == tokenizer._tokenizer.decode(
        probe, skip_special_tokens=skip) for skip in (True, False))


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """Ids of SentencePiece byte-fallback tokens (``<0x00>`` .. ``<0xFF>``), cached on the tokenizer."""
    def find() -> frozenset[int]:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        return frozenset(i for piece, i in vocab.items() if _BYTE_FALLBACK.match(piece))

    return _kept_on(tokenizer, "_proxy_serve_byte_ids", find)


def _kept_on(tokenizer, attribute: str, compute: Callable[[], T]) -> T:
    """``compute()``, worked out once per tokenizer and kept on it as ``attribute`` (recomputed each time for a
    tokenizer that refuses attributes: tests' fakes)."""
    value = getattr(tokenizer, attribute, None)
    if value is None:
        value = compute()
        try:
            setattr(tokenizer, attribute, value)
        except AttributeError:
            pass
    return value


def partial_bytes_key(raw: bytes) -> str:
    """OpenAI's spelling of a token that is part of a UTF-8 character: ``bytes:\\xe6\\x9d``."""
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@dataclass
class StepText:
    delta: str
    stopped: bool  # a stop string matched: the sequence is finished
    token_text: str = ""  # the text this token added (logprobs' ``token``; the tokens' texts join to the text)
    stop: str | None = None  # the stop string that matched, when ``stopped``


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into safe-to-stream text deltas.

    ``prompt_ids`` (the primary model's prompt) is the context of the first tokens: only its tail is kept.
    """

    def __init__(
        self, tokenizer, stops: list[str], include_stop: bool = False, skip_special_tokens: bool = True,
        prompt_ids: list[int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids or [])[-_MAX_CONTEXT_TOKENS:]
        self.ids: list[int] = context  # the prompt's tail, then every generated token
        self.text = ""  # all decoded text so far (complete characters only)
        self.sent = 0  # characters of ``text`` already streamed
        # ids[_prefix:_read] were decoded as context for the next delta
        self._prefix = max(0, len(context) - _CONTEXT_TOKENS)
        self._read = len(context)
        self._bytes = byte_fallback_ids(tokenizer)
        self._decode = backend_decode(tokenizer, skip_special_tokens)  # ids -> text
        self.flushed = ""  # text that only ``finish`` committed
        self.stopped = False

    @property
    def settled(self) -> bool:
        """Whether every token added is in ``text``: none waits to complete a character (or decoded to nothing)."""
        return self._read == len(self.ids)

    def _context(self) -> str:
        """The decoded window before the pending tokens, widened while it decodes to nothing (only special
        tokens, say) so that a SentencePiece decoder does not take the next token's space for a leading one."""
        before = self._decode(self.ids[self._prefix : self._read])
        while not before and self._prefix > 0 and self._read - self._prefix < _MAX_CONTEXT_TOKENS:
            self._prefix = max(0, self._prefix - _CONTEXT_TOKENS)
            before = self._decode(self.ids[self._prefix : self._read])
        return before

    def add(self, token_id: int, check_stops: bool = True) -> StepText:
        """Take one generated token; return what may be streamed now (stop strings matched if ``check_stops``)."""
        self.ids.append(token_id)
        added = ""
        if token_id not in self._bytes:  # a byte run commits when a token that is not a byte ends it
            before = self._context()
            after = self._decode(self.ids[self._prefix :])
            if len(after) > len(before) and not after.endswith(REPLACEMENT):
                added = after[len(before) :]
                self.text += added
                self._prefix = max(self._prefix, len(self.ids) - _CONTEXT_TOKENS)
                self._read = len(self.ids)
        step = self._release(final=False, check_stops=check_stops)
        step.token_text = added
        return step

    def render(self, token_ids: list[int]) -> list[str]:
        """Each candidate's text if it came next (before ``add``): the top-logprobs keys, distinct.

        A candidate is rendered in context (decode(context + candidate) - decode(context)), so SentencePiece's
        ``▁P`` is `` P`` and ``P`` is ``P``. A candidate that makes no complete character (part of a UTF-8
        character, a skipped special token) is spelled as OpenAI spells partial bytes (``bytes:\\xe6``) or by
        its vocabulary piece; any remaining clash gets the id appended, so no entry is lost.
        """
        before = self._context()
        window = self.ids[self._prefix :]
        keys: list[str] = []
        seen: set[str] = set()
        for token_id in token_ids:
            after = self._decode([*window, token_id])
            text = after[len(before) :] if after.startswith(before) else ""
            if token_id in self._bytes or not text or text.endswith(REPLACEMENT) or text in seen:
                raw = token_bytes(self.tokenizer, token_id)
                try:
                    complete = raw.decode("utf-8") if raw else ""
                except UnicodeDecodeError:
                    complete = None
                text = partial_bytes_key(raw) if complete is None else self.tokenizer.convert_ids_to_tokens(token_id)
                if not isinstance(text, str) or not text or text in seen:
                    text = f"{text}#{token_id}"
            seen.add(text)
            keys.append(text)
        return keys

    def finish(self) -> str:
        """The sequence ended for another reason (length, EOS, abort): flush what was held back."""
        if self.stopped:
            return ""
        before = self._context()
        tail = self._decode(self.ids[self._prefix :])
        if len(tail) > len(before):  # an incomplete character (or byte run) at the very end: as decoded
            self.flushed = tail[len(before) :]  # the last token's text grows by this (logprobs)
            self.text += self.flushed
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
                return StepText(delta, True, stop=stop)
        end = len(self.text) if final else len(self.text) - held_back(self.text[self.sent :], self.stops)
        delta = self.text[self.sent : end]
        self.sent = end
        return StepText(delta, False)
