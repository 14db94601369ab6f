"""vLLM's ``bad_words``: words the output must not contain, banned token by token as they would complete.

Each word becomes the token sequences that spell it at the start of a text and after a space. A sequence of
one token is banned outright; a longer one has its last token banned whenever the output ends with the rest of
it (vLLM's rule). Only the output counts: a word the prompt ends with half-written may still be completed.

Unlike vLLM, the after-a-space spelling is kept whatever its token count: vLLM drops it when it has another
number of tokens than the word alone, so with a byte-level BPE ``bad_words: ["hedgehog"]`` let `` hedgehog``
(``Ġhedge`` ``hog`` against ``hed`` ``ge`` ``hog``) through in mid-sentence, which is where words occur.
"""

from __future__ import annotations

from collections.abc import Sequence


def bad_word_token_ids(tokenizer, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The token sequences of ``words``: each word alone, and after a space (byte-level BPE's ``Ġword``;
    SentencePiece's dummy prefix already spells the word alone as ``▁word``, and its ``▁`` ``▁word`` is
    dropped: the second token alone is the same ban)."""
    spelled: list[tuple[int, ...]] = []
    for word in words:
        alone = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced[1:] == alone:  # a lone space token before the word: banning the word alone covers it
            spaced = ()
        spelled += [ids for ids in (alone, spaced) if ids]
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
