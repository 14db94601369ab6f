"""The unmerged-LoRA benchmark runs end to end on a tiny family; it asserts what it measures (one copy of the small
model against two), never a timing."""

from __future__ import annotations

import json

from bench import lora_bench
from proxy_engine.config import CPU_THREADS_ENV
from tests.threads import torch_threads


def test_lora_bench_runs_on_a_tiny_family(tmp_path, monkeypatch):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)
    with torch_threads():
        lora_bench.main(["--family", "tiny", "--family-dir", str(tmp_path / "family"), "--tokens", "4",
                         "--repeats", "1", "--threads", "1", "--rank", "4", "--out", str(tmp_path / "out")])
    payload = json.loads((tmp_path / "out" / "lora.json").read_text())
    assert payload["meta"]["models"] == {"unmerged": 3, "merged": 3}
    held = payload["parameter_bytes"]
    assert held["unmerged"] < held["merged"]  # the expert holds its terms, not a copy of the small model
    assert set(payload["tokens_per_s"]) == {"unmerged_b1", "merged_b1", "unmerged_b16", "merged_b16"}
    assert (tmp_path / "out" / "adapter-tiny-r4" / "adapter_config.json").exists()
    assert "| unmerged | 3 |" in (tmp_path / "out" / "lora.md").read_text()
