"""Shape buckets for the static decode step: batch sizes and attended spans that repeat, so a CUDA graph
captured for a bucket replays every step that falls into it.

Pure functions, no torch: the runner pads a step's rows up to its batch bucket (the padding rows live in free
slots, write column 0 there and are never read) and attends over the span bucket (columns past a row's own
position are masked), so the shapes a step sees are a small fixed set.
"""

from __future__ import annotations

MIN_SPAN = 256  # the smallest attended span: short contexts all share one graph per batch size


def batch_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, ... below ``max_rows``, then ``max_rows`` itself (a row count past it has no bucket)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, not {max_rows}")
    buckets, size = [], 1
    while size < max_rows:
        buckets.append(size)
        size *= 2
    return [*buckets, max_rows]


def span_buckets(capacity: int, minimum: int = MIN_SPAN) -> list[int]:
    """Powers of two from ``minimum`` (or ``capacity`` when smaller) below ``capacity``, then ``capacity``."""
    if capacity < 1 or minimum < 1:
        raise ValueError(f"capacity and minimum must be positive, not {capacity} and {minimum}")
    buckets, size = [], minimum
    while size < capacity:
        buckets.append(size)
        size *= 2
    return [*buckets, capacity]


def bucket_for(value: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding ``value`` (sorted ``buckets``), or None past the largest."""
    for bucket in buckets:
        if value <= bucket:
            return bucket
    return None
