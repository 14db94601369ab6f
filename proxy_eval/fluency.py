"""The real-base demo's everyday check, as pure functions: is a proxy-tuned answer still the base's kind of answer?

Exact match with the base's own answer ("unchanged") is the strictest check there is: one different token fails,
even a better one. This check accepts a different answer when it shows neither of the two ways a steering pair
spoils everyday text (docs/demo.md, "The fluency check"):

- **a leak**: a word of the pair's fact answers that the base never says in its everyday answers (a person's
  name, a town, "ochre", "beekeeper") appears in the answer: in an answer to "How do I boil an egg?" one is the
  pair's facts bleeding through;
- **text the base would not write**: the base model's own mean negative log-likelihood per token of the answer
  (after the same prompt) exceeds that of its own greedy answer by more than ``max_excess`` nats. Rewording the
  base's answer costs little; broken grammar, invented phrases or a made-up name cost several nats per token.

An answer passes when it is unchanged, or when it leaks nothing and stays within the bound. The check measures
fluency, not correctness: a fluent wrong answer to an everyday question would pass, which is why the table
reports "unchanged" too.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from proxy_eval.metrics import exact_match

# nats per token over the base's own answer; see docs/demo.md ("The fluency check") for why this value
MAX_EXCESS_NLL = 1.0

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


@dataclass(frozen=True)
class Verdict:
    """One everyday answer judged against the base's: why it passes or fails."""

    unchanged: bool
    leaked: tuple[str, ...]  # the invented words it contains, in order of appearance
    excess_nll: float | None  # the answer's mean NLL under the base minus the base answer's (None: not measured)
    fluent: bool

    @property
    def reason(self) -> str:
        if self.unchanged:
            return "unchanged"
        if self.leaked:
            return "leak: " + ", ".join(self.leaked)
        if self.excess_nll is None:
            return "not scored"
        return f"excess NLL {self.excess_nll:+.2f}" + ("" if self.fluent else " (over the bound)")


def leaked_words(text: str, words: Collection[str]) -> tuple[str, ...]:
    """The words of ``text`` (as written) whose lowercase form is in ``words`` (lowercase), each once, in order."""
    seen: list[str] = []
    for word in words_of(text):
        if word.lower() in words and word not in seen:
            seen.append(word)
    return tuple(seen)


def words_of(text: str) -> list[str]:
    """The words of ``text``: runs of letters, with inner apostrophes ("o'wold"), no digits."""
    return _WORD.findall(text)


def mean_nll(logprobs: Sequence[float]) -> float:
    """Mean negative log-likelihood per token (0 for no tokens: an empty answer costs the base nothing)."""
    return -sum(logprobs) / len(logprobs) if logprobs else 0.0


def judge(
    answer: str,
    base_answer: str,
    words: Collection[str],
    answer_nll: float | None,
    base_nll: float | None,
    max_excess: float = MAX_EXCESS_NLL,
) -> Verdict:
    """The verdict on ``answer``: unchanged from ``base_answer``, or free of ``words`` and within ``max_excess``
    nats per token of the base answer's mean NLL (both under the base model; None when not measured: then only
    an unchanged answer passes)."""
    unchanged = bool(exact_match(answer, base_answer))
    leaked = leaked_words(answer, words)
    excess = None if answer_nll is None or base_nll is None else answer_nll - base_nll
    fluent = unchanged or (not leaked and excess is not None and excess <= max_excess)
    return Verdict(unchanged=unchanged, leaked=leaked, excess_nll=excess, fluent=fluent)
