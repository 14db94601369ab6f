"""The prefix-cache benchmark runs end to end on a tiny family and writes its table; no timings asserted."""

from __future__ import annotations

import json

from bench import prefix_bench
from proxy_engine.config import CPU_THREADS_ENV
from tests.threads import torch_threads


def test_prefix_bench_runs_on_a_tiny_family(tmp_path, monkeypatch):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)  # the bench sets it; monkeypatch puts it back
    with torch_threads():  # the bench sets this thread's team
        prefix_bench.main(["--family", "tiny", "--family-dir", str(tmp_path / "family"), "--repeats", "1",
                           "--prefix-tokens", "120", "--batch", "2", "--burst", "3", "--traffic-prompt", "24",
                           "--traffic-tokens", "2", "--mixed-tokens", "64", "--threads", "1", "--out",
                           str(tmp_path / "out")])
    payload = json.loads((tmp_path / "out" / "prefix.json").read_text())
    assert payload["meta"]["family"] == "tiny"
    assert len(payload["ratios"]) == 7 and all(value > 0 for value in payload["ratios"].values())
    # The shared prefix and the chat's first turn were found in every model's cache.
    assert all(hits > 0 for hits, _ in payload["hits_queries"].values())
    table = (tmp_path / "out" / "prefix.md").read_text()
    assert "TTFT shared prefix / unshared" in table and "cache on / off" in table
    assert "TTFT of a burst of 3 sharing a cached prefix (mean) / one alone" in table
    assert "TTFT of a warm prompt sent with a cold one, kept apart / prefilled together" in table
