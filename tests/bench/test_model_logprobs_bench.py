"""The model_logprobs benchmark runs end to end on a tiny family and writes its table; no timings asserted."""

from __future__ import annotations

import json

from bench import model_logprobs_bench
from proxy_engine.config import CPU_THREADS_ENV
from tests.threads import torch_threads


def test_model_logprobs_bench_runs_on_a_tiny_family(tmp_path, monkeypatch):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)  # the bench sets it; monkeypatch puts it back
    with torch_threads():  # the bench sets this thread's team
        model_logprobs_bench.main(["--family", "tiny", "--family-dir", str(tmp_path / "family"), "--tokens", "3",
                                   "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "out")])
    payload = json.loads((tmp_path / "out" / "model_logprobs.json").read_text())
    assert set(payload["samples"]) == {"off_b1", "on_b1", "off_b16", "on_b16"}
    assert all(rate > 0 for values in payload["samples"].values() for rate, _ in values)
    assert len(payload["ratios"]) == 4 and all(value > 0 for value in payload["ratios"].values())
    assert "| on / off, 16 sequence(s) |" in (tmp_path / "out" / "model_logprobs.md").read_text()
