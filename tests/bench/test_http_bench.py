"""The HTTP benchmark's quick mode runs end to end (servers on loopback, streaming clients); no timings asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *extra: str) -> dict:
    family_dir = tmp_path / "family"
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "bench.http_bench", "--quick", "--family-dir", str(family_dir), "--out", str(out),
         "--threads", "1", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads((out / "http.json").read_text())
    assert (out / "http.md").read_text().startswith("family: tiny")
    return payload


def test_quick_run_against_proxy_serve(tmp_path):
    payload = _run(tmp_path)
    levels = {(r["server"], r["concurrency"]): r for r in payload["levels"]}
    assert set(levels) == {("proxy", 1), ("proxy", 4), ("base", 1), ("base", 4)}
    for (_server, concurrency), level in levels.items():
        assert level["errors"] == 0 and level["stalled"] == 0, level["error_samples"]
        # EOS ignored: every request streams exactly max_tokens tokens.
        assert level["tokens"] == level["requested_tokens"] == level["requests"] * payload["meta"]["max_tokens"]
        assert level["requests"] == concurrency
        assert level["ttft_p50_ms"] is not None and level["tokens_per_s"] > 0
        assert level["rss_peak_first_mb"] > 0


def test_quick_run_against_the_peer(tmp_path):
    """``transformers serve --continuous-batching`` starts offline on a local path and streams max_tokens tokens."""
    payload = _run(tmp_path, "--servers", "peer", "proxy", "--levels", "2")
    levels = {(r["server"], r["concurrency"]): r for r in payload["levels"]}
    assert set(levels) == {("peer", 2), ("proxy", 2)}
    for level in levels.values():
        assert level["errors"] == 0, level["error_samples"]
        assert level["tokens"] == level["requested_tokens"] == 2 * payload["meta"]["max_tokens"]
    assert any(name.startswith("proxy / peer") for name in payload["ratios"])


def test_a_variant_is_served_and_compared_side_by_side(tmp_path):
    """``--variant NAME:VAR=VALUE``: the same code under other environment variables, as proxy@NAME."""
    payload = _run(tmp_path, "--servers", "proxy", "--levels", "1", "--variant", "passive:OMP_WAIT_POLICY=PASSIVE")
    assert {(r["server"], r["concurrency"]) for r in payload["levels"]} == {("proxy", 1), ("proxy@passive", 1)}
    assert all(r["errors"] == 0 for r in payload["levels"])
    assert "proxy / proxy@passive, 1 streams" in payload["ratios"]
