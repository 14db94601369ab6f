"""The constrained-decoding benchmark runs end to end on a tiny family and writes its rows; no timings asserted."""

from __future__ import annotations

import json

from bench import structured_bench
from proxy_engine.config import CPU_THREADS_ENV


def test_structured_bench_runs_on_a_tiny_family(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)  # the bench sets it; monkeypatch puts it back
    structured_bench.main(["--family", "tiny", "--family-dir", str(tmp_path / "family"), "--tokens", "4",
                           "--repeats", "1", "--batch", "1", "2", "--out", str(tmp_path / "out")])
    payload = json.loads((tmp_path / "out" / "structured.json").read_text())
    assert [row["batch"] for row in payload["rows"]] == [1, 2]
    assert all(row["free_ms"] > 0 and row["constrained_ms"] > 0 and row["ratio"] > 0 for row in payload["rows"])
    assert "| sequences | free step (ms) | JSON-schema step (ms) | ratio |" in capsys.readouterr().out
