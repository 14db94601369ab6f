"""The bomb benchmark runs end to end on a tiny family, small bombs, and writes its table; no timings asserted."""

from __future__ import annotations

import json

from bench import bomb_bench


def test_bomb_bench_runs_and_counts_the_bombs_answers(tmp_path):
    results = bomb_bench.main(["--family-dir", str(tmp_path / "family"), "--plain", "2", "--tool-bombs", "1",
                               "--tool-mb", "1.5", "--grammar-bombs", "1", "--properties", "600", "--threads", "1",
                               "--out", str(tmp_path / "out")])
    assert set(results["this"]["phases"]) == {"tool bombs", "grammar bombs", "both"}
    answers: dict = {}
    for phase in results["this"]["phases"].values():
        answers.update(phase["bomb_statuses"])
    # Both kinds of bomb reached the server and every answer was a refusal (400, or 429 for a grammar that
    # waited past its budget), never a 5xx.
    assert any(k.startswith("tool ") for k in answers) and any(k.startswith("grammar ") for k in answers), answers
    assert {k.split()[1] for k in answers} <= {"400", "429"}, answers
    payload = json.loads((tmp_path / "out" / "bombs.json").read_text())
    assert all(phase["ratio"] > 0 for phase in payload["results"]["this"]["phases"].values())
    assert "| / idle |" in (tmp_path / "out" / "bombs.md").read_text()
