"""vLLM's ``bad_words``: words the output must not contain, banned token by token as they would complete.

Each word becomes the token sequences that spell it at the start of a text and after a space (as vLLM
tokenizes them, so that a request means the same on both servers). A sequence of one token is banned outright;
a longer one has its last token banned whenever the output ends with the rest of it. Only the output counts:
a word the prompt ends with half-written may still be completed (vLLM's rule too).
"""

from __future__ import annotations

from collections.abc import Sequence


def bad_word_token_ids(tokenizer, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The token sequences of ``words``: each word alone, and after a space when that spells it with other
    tokens of the same count (byte-level BPE's ``Ġword``; SentencePiece gives the same pieces both ways)."""
    spelled: list[tuple[int, ...]] = []
    for word in words:
        alone = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if alone:
            spelled.append(alone)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced and alone and spaced[0] != alone[0] and len(spaced) == len(alone):
            spelled.append(spaced)
    return tuple(dict.fromkeys(spelled))  # distinct, in order


def banned_next(word_ids: Sequence[Sequence[int]], output_ids: Sequence[int]) -> list[int]:
    """The tokens that would complete a bad word after ``output_ids``."""
    banned = []
    for ids in word_ids:
        head = len(ids) - 1
        if head > len(output_ids):
            continue
        if head == 0 or list(output_ids[-head:]) == list(ids[:head]):
            banned.append(ids[-1])
    return banned
