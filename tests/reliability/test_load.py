"""A small version of ``bench/load_test.py`` (the full one: ``python -m bench.load_test``): streaming requests
with random parameters at concurrency against a ``proxy-serve`` subprocess, a quarter of the clients leaving
mid-stream. Nothing may be lost: every completed stream is exact (its ``max_tokens`` or a real stop, usage,
``[DONE]``), none stalls, the engine empties, the server's memory comes back, and SIGTERM exits 0."""

from __future__ import annotations

from bench.load_test import LoadConfig, run, write_report


def test_small_load_loses_nothing(tiny_family, tmp_path):
    config = LoadConfig(requests=48, concurrency=16, rounds=1, warmup=8, max_tokens=48, overload=False,
                        stall_s=60.0, round_limit_s=240.0)
    result = run(config, family=tiny_family, log_dir=tmp_path)
    write_report(result, tmp_path / "load")
    report = (tmp_path / "load.md").read_text()
    (round_,) = result["rounds"]
    assert round_["failures"] == 0, round_["failure_examples"]
    # 12 clients mean to leave; one whose stream ends (a stop) before its moment to leave completes instead.
    assert round_["completed_ok"] == round_["completed"] == 48 - round_["disconnected"], report
    assert 8 <= round_["disconnected"] <= 12, report
    assert round_["stalled"] == 0 and round_["without_done"] == 0, report
    assert not any(round_["engine_after"].values()), report
    assert result["ok"], report
