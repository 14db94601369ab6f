"""A cap on a reasoning model's thinking (vLLM's ``thinking_token_budget``, Anthropic's ``budget_tokens``).

A sequence with a budget counts the tokens it writes inside its thinking block. Once they reach the budget, its
next tokens are forced to the block's closing tag (``</think>``, ``[/THINK]``, ...), one per step, and the model
then answers: thinking that would have run to ``max_tokens`` ends with room left for the answer. A model that
closes the block itself, in budget, is never touched.

Where the block is read from is the reasoning parser's rule (``ThinkingTags``, filled in by the server): a
template that opens the block in the prompt (DeepSeek-R1, OLMo 3) starts the answer inside it; otherwise the
block starts where the model writes an opening tag. Tags are found in the output's text, so a tag written in
several tokens, or in a token that also holds other text, counts alike. The tag is forced between characters:
a budget spent inside a character written in several byte tokens waits for its last byte (a few tokens at most,
``SETTLE_TOKENS``), so the thinking never ends in half a character. Pure bookkeeping, no tensors: the sampling
batch asks ``forced`` for the token to force (``sampling.thinking_budget``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy_engine.marks import first_mark
from proxy_engine.request import ThinkingTags

# The most tokens a spent budget waits for the text to reach a character's end (UTF-8's 4 bytes, byte tokens).
SETTLE_TOKENS = 4


@dataclass(eq=False)
class ThinkingBudget:
    """One sequence's count of thinking tokens against its budget, and the closing tag's tokens to force."""

    budget: int
    tags: ThinkingTags
    close_ids: tuple[int, ...]  # ``tags.closes[0]`` as the tokenizer writes it alone: what is forced
    opened_at: int | None = None  # output tokens written when the block opened (0: opened in the prompt)
    text_from: int = 0  # where in the output's text the block's content begins (a closing tag is looked for after)
    closed: bool = False
    forcing: int | None = None  # the index in ``close_ids`` of the next token to force
    _searched: int = field(default=0, repr=False)  # the text up to here holds no tag being looked for

    def __post_init__(self) -> None:
        if self.tags.opened:
            self.opened_at = 0
        self._check_budget(0)

    def forced(self) -> int | None:
        """The token the next step must write, or None to sample freely."""
        return None if self.forcing is None else self.close_ids[self.forcing]

    def observe(self, text: str, tokens: int, settled: bool = True) -> None:
        """After each token: ``text`` is the output's text so far (whole characters), ``tokens`` how many tokens
        it holds, ``settled`` whether every one of them is in the text (none ends inside a character)."""
        if self.closed:
            return
        if self.forcing is not None:  # the forced token was written
            self.forcing += 1
            if self.forcing == len(self.close_ids):
                self.closed, self.forcing = True, None
            return
        if self.opened_at is None:
            found = self._find(text, self.tags.opens)
            if found is None:
                return
            self.opened_at, self.text_from = tokens, found
        if self._find(text, self.tags.closes) is not None:  # the model closed the block itself
            self.closed = True
            return
        self._check_budget(tokens, settled)

    def _check_budget(self, tokens: int, settled: bool = True) -> None:
        if self.opened_at is None or self.closed:
            return
        spent = tokens - self.opened_at - self.budget
        if spent >= 0 and (settled or spent >= SETTLE_TOKENS):
            self.forcing = 0 if self.close_ids else None
            self.closed = not self.close_ids

    def _find(self, text: str, tags: tuple[str, ...]) -> int | None:
        """Where the first of ``tags`` found past ``text_from`` ends, looking only at what is new (a tag may
        straddle the last look)."""
        longest = max(len(tag) for tag in tags)
        found = first_mark(text, tags, max(self.text_from, self._searched - longest + 1))
        if found is None:
            self._searched = len(text)
            return None
        at, tag = found
        self._searched = self.text_from = at + len(tag)
        return self.text_from
