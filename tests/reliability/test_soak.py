"""A few seconds of ``bench/soak.py`` (the full run: ``python -m bench.soak``, 10 minutes at concurrency 64):
streams, clients leaving mid-stream, scoring, tokenize, hostile bodies, all at once against a ``proxy-serve``
subprocess. No 5xx, no connection error, every completed stream ends in ``[DONE]``, the engine is idle at
the end and SIGTERM exits 0."""

from __future__ import annotations

from bench.soak import SoakConfig, run


def test_quick_soak(tiny_family, tmp_path):
    # Memory is checked in the full run: a few seconds are all warm-up.
    config = SoakConfig(seconds=8.0, concurrency=16, max_tokens=16, rss_limit_mb=10_000)
    result = run(config, family=tiny_family, log_dir=tmp_path)
    assert result["ok"], (result["checks"], result["failures"], result["statuses"])
    assert result["requests"] >= 16 and result["statuses"].get("200", 0) > 0
    assert set(result["by_action"]) >= {"stream", "hostile"}
