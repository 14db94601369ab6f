"""Bucket choice: batch sizes and spans that repeat, so each captured graph serves many steps."""

from __future__ import annotations

import pytest

from proxy_engine.executor.buckets import batch_buckets, bucket_for, span_buckets


def test_batch_buckets_are_powers_of_two_then_the_limit():
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_span_buckets_start_at_the_minimum_and_end_at_the_capacity():
    assert span_buckets(4096) == [256, 512, 1024, 2048, 4096]
    assert span_buckets(1516) == [256, 512, 1024, 1516]
    assert span_buckets(100) == [100]  # a capacity under the minimum: one bucket
    assert span_buckets(64, minimum=16) == [16, 32, 64]


def test_bucket_for_is_the_smallest_that_holds_the_value():
    buckets = [1, 2, 4, 8, 12]
    assert [bucket_for(v, buckets) for v in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    assert bucket_for(13, buckets) is None  # past the largest: decoded eagerly
