"""Marks that arrive a piece at a time (a call's tag, a thinking tag, a string's closing mark): how much of the
end of a text may be the start of one, to be held back from a stream until more text decides."""

from __future__ import annotations


def first_mark(text: str, marks: tuple[str, ...], start: int = 0) -> tuple[int, str] | None:
    """The earliest of ``marks`` in ``text`` from ``start``: where it begins, and which it is; None if none is there."""
    found = [(at, mark) for mark in marks if (at := text.find(mark, start)) >= 0]
    return min(found) if found else None


def held_tail(text: str, marks: tuple[str, ...], start: int = 0) -> int:
    """Length of the longest end of ``text[start:]`` that is a proper prefix of one of ``marks``."""
    for size in range(min(max(map(len, marks)) - 1, len(text) - start), 0, -1):
        tail = text[len(text) - size:]
        if any(size < len(mark) and mark.startswith(tail) for mark in marks):
            return size
    return 0
