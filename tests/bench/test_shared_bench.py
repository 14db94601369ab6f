"""The shared anti-expert benchmark runs end to end on a tiny family; it asserts what it measures is the same
answer from fewer models, never a timing."""

from __future__ import annotations

import json

from bench import shared_bench
from proxy_engine.config import CPU_THREADS_ENV
from tests.threads import torch_threads


def test_shared_bench_runs_on_a_tiny_family(tmp_path, monkeypatch):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)
    with torch_threads():
        shared_bench.main(["--family", "tiny", "--family-dir", str(tmp_path / "family"), "--tokens", "4",
                           "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "out")])
    payload = json.loads((tmp_path / "out" / "shared.json").read_text())
    assert payload["meta"]["models"] == {"shared": 4, "copies": 5} and payload["meta"]["same_tokens"] is True
    assert payload["parameter_bytes"]["shared"] < payload["parameter_bytes"]["copies"]
    assert set(payload["tokens_per_s"]) == {"shared_b1", "copies_b1", "shared_b16", "copies_b16"}
    assert all(value > 0 for value in payload["ratios"].values())
    assert "| shared | 4 |" in (tmp_path / "out" / "shared.md").read_text()
