"""Pure scoring functions: answer normalisation, the three task metrics, and the gap-closed ratio."""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

METRICS = ("exact_match", "contains", "choice")

_PUNCT = set(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014", "\u2026"}
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, drop punctuation (ASCII and the common typographic marks), collapse and strip whitespace."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if (ch in _PUNCT or unicodedata.category(ch).startswith("P")) else ch for ch in text)
    return _SPACES.sub(" ", text).strip()


def _references(reference: str | Sequence[str]) -> list[str]:
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError("reference must be a string or a non-empty list of strings")
    return refs


def exact_match(prediction: str, reference: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    pred = normalize(prediction)
    return float(any(pred == normalize(r) for r in _references(reference)))


def contains(prediction: str, reference: str | Sequence[str]) -> float:
    """1.0 when any normalised reference occurs in the normalised prediction, on word boundaries."""
    pred = f" {normalize(prediction)} "
    return float(any(normalize(r) and f" {normalize(r)} " in pred for r in _references(reference)))


def pick_choice(prediction: str, choices: Sequence[str]) -> int | None:
    """The index of the choice the prediction picks, or None.

    A prediction that equals a choice (normalised) picks it; otherwise the choice whose text appears first
    in the prediction (on word boundaries; the longer one on a tie, so 'blue green' beats 'blue').
    """
    pred = normalize(prediction)
    norm = [normalize(c) for c in choices]
    for i, c in enumerate(norm):
        if c and pred == c:
            return i
    padded = f" {pred} "
    best: tuple[int, int, int] | None = None  # (position, -length, index)
    for i, c in enumerate(norm):
        if not c:
            continue
        pos = padded.find(f" {c} ")
        if pos >= 0:
            key = (pos, -len(c), i)
            best = key if best is None or key < best else best
    return None if best is None else best[2]


def choice(prediction: str, reference: str | Sequence[str], choices: Sequence[str]) -> float:
    """1.0 when the choice the prediction picks is (normalised) one of the references."""
    if not choices:
        raise ValueError("the choice metric needs a non-empty 'choices' list")
    picked = pick_choice(prediction, choices)
    if picked is None:
        return 0.0
    return float(any(normalize(choices[picked]) == normalize(r) for r in _references(reference)))


def score(metric: str, prediction: str, reference: str | Sequence[str], choices: Sequence[str] | None = None) -> float:
    if metric == "exact_match":
        return exact_match(prediction, reference)
    if metric == "contains":
        return contains(prediction, reference)
    if metric == "choice":
        return choice(prediction, reference, choices or [])
    raise ValueError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")


def gap_closed(base: float, proxy: float, tuned: float, eps: float = 1e-12) -> tuple[float | None, str | None]:
    """(proxy - base) / (tuned - base), or (None, reason) when tuning did not move the metric."""
    gap = tuned - base
    if abs(gap) <= eps:
        return None, f"tuned and base score the same ({tuned:.4g}): there is no gap to close"
    return (proxy - base) / gap, None
