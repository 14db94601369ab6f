"""The engine benchmark runs end to end on a tiny family and writes its table; no timings asserted."""

from __future__ import annotations

import json

from bench import engine_bench
from proxy_engine.config import CPU_THREADS_ENV
from tests.threads import torch_threads


def test_engine_bench_runs_on_a_tiny_family(tmp_path, monkeypatch):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)  # the bench sets it; monkeypatch puts it back
    with torch_threads():  # the bench sets this thread's team
        engine_bench.main(["--family", "tiny", "--family-dir", str(tmp_path / "family"), "--tokens", "4",
                           "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "out")])
    payload = json.loads((tmp_path / "out" / "engine.json").read_text())
    assert payload["meta"]["family"] == "tiny"
    rows = {"floor_b1", "engine_b1", "floor_b16", "engine_b16", "research_mixed", "engine_mixed"}
    assert set(payload["tokens_per_s"]) == rows
    assert all(rate > 0 for rate in payload["tokens_per_s"].values())
    assert len(payload["ratios"]) == 6 and all(value > 0 for value in payload["ratios"].values())
    table = (tmp_path / "out" / "engine.md").read_text()
    assert table.startswith("family tiny;") and "| engine / floor, 1 sequence |" in table
