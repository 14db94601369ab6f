"""A small version of ``bench/load_test.py`` (the full one: ``python -m bench.load_test``): streaming requests
with random parameters at concurrency against a ``proxy-serve`` subprocess, a quarter of the clients leaving
mid-stream. Nothing may be lost: every completed stream is exact (its ``max_tokens`` or a real stop, usage,
``[DONE]``), none stalls, the engine empties, the server's memory comes back, and SIGTERM exits 0."""

from __future__ import annotations

from bench.load_test import LoadConfig, run, write_report


def test_small_load_loses_nothing(tiny_family, tmp_path):
    # Two rounds: a leak shows as growth from the first round's end to the second's (the allocator's
    # high-water mark after the first round is not one).
    config = LoadConfig(requests=32, concurrency=16, rounds=2, warmup=16, max_tokens=48, overload=False,
                        stall_s=60.0, round_limit_s=240.0)
    result = run(config, family=tiny_family, log_dir=tmp_path)
    write_report(result, tmp_path / "load")
    report = (tmp_path / "load.md").read_text()
    assert len(result["rounds"]) == 2
    for round_ in result["rounds"]:
        assert round_["failures"] == 0, round_["failure_examples"]
        # 8 clients a round mean to leave; one whose stream ends (a stop) before its moment to leave completes.
        assert round_["completed_ok"] == round_["completed"] == 32 - round_["disconnected"], report
        assert 4 <= round_["disconnected"] <= 8, report
        assert round_["stalled"] == 0 and round_["without_done"] == 0, report
        assert not any(round_["engine_after"].values()), report
    assert result["memory"]["reference"] == "first round"
    assert result["ok"], report
