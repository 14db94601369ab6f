"""The beam-search benchmark runs end to end on a tiny family and writes its table; no timings asserted."""

from __future__ import annotations

import json

from bench import beam_bench
from proxy_engine.config import CPU_THREADS_ENV
from tests.threads import torch_threads


def test_beam_bench_runs_on_a_tiny_family(tmp_path, monkeypatch):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)  # the bench sets it; monkeypatch puts it back
    with torch_threads():  # the bench sets this thread's team
        beam_bench.main(["--family", "tiny", "--family-dir", str(tmp_path / "family"), "--repeats", "1",
                         "--width", "2", "--tokens", "3", "--prompt-tokens", "20", "--threads", "1",
                         "--out", str(tmp_path / "out")])
    payload = json.loads((tmp_path / "out" / "beam.json").read_text())
    assert payload["meta"]["family"] == "tiny" and payload["meta"]["width"] == 2
    assert len(payload["ratios"]) == 3 and all(value > 0 for value in payload["ratios"].values())
    assert "beam search / sampled, 2 x 3 tokens" in (tmp_path / "out" / "beam.md").read_text()
