"""The HTTP benchmark's quick mode runs end to end (servers on loopback, streaming clients); no timings asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


# --- token counting and a server that produces nothing, without servers --------------------------------------
def _sse(*events: dict | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def _stream(payload: bytes):
    import asyncio

    import httpx

    from bench.http_bench import one_stream

    async def go():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=payload))
        async with httpx.AsyncClient(transport=transport) as client:
            return await one_stream(client, "http://peer", {"prompt": "x", "stream": True}, stall_s=5)

    return asyncio.run(go())


def _text(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def test_a_stream_without_usage_counts_its_content_events():
    """transformers serve 5.25 sends usage only when asked: its tokens are then its content events."""
    result = _stream(_sse(_text("a"), _text(" b"), _text(""), _text("c"), _text("", "length")))
    assert result.ok and not result.usage
    assert result.tokens == result.events == 3
    assert result.first is not None and len(result.gaps) == 2


def test_usage_wins_over_the_event_count():
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}}
    result = _stream(_sse(_text("ab"), _text("cd", "length"), usage, "[DONE]"))
    assert result.ok and result.usage and result.events == 2 and result.tokens == 5


def _run_of(streams: list, target: str = "peer"):
    from bench.http_bench import Run

    return Run(target, len(streams), streams, start=0.0, end=1.0, rss_start=0, rss_end=0, rss_peak=0, cpu_s=0.5)


def test_a_server_with_no_tokens_is_an_error_naming_it():
    import pytest

    from bench.http_bench import NoTokensError, StreamResult, compute_ratios, require_tokens, summarize

    silent = _stream(_sse(_text("", "length")))
    assert silent.ok and silent.tokens == 0
    run = _run_of([silent, StreamResult(ok=False, error="HTTP 500: boom")])
    with pytest.raises(NoTokensError, match=r"^peer produced no tokens at 2 stream\(s\), 2 request\(s\): errors: "
                                            r"HTTP 500: boom \(its log: peer.log\)$"):
        require_tokens(run, Path("peer.log"))
    require_tokens(_run_of([_stream(_sse(_text("a", "length")))]))  # one token is enough
    # The figures themselves never divide by zero or take the median of nothing.
    proxy = _run_of([_stream(_sse(_text("a"), _text("b", "length")))], "proxy")
    runs = {("proxy", 2): [proxy], ("peer", 2): [run]}
    levels = {key: summarize(value) for key, value in runs.items()}
    ratios = compute_ratios(runs, levels, {})
    assert ratios["proxy / peer (base alone), 2 streams"] is None


def test_the_llama_peer_needs_its_binary_and_gguf(monkeypatch, capsys):
    from bench import http_bench

    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    monkeypatch.delenv("LLAMA_GGUF", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        http_bench.main(["--family", "tiny", "--servers", "base", "llama"])
    assert exit_info.value.code == 2
    assert "--llama-server" in capsys.readouterr().err


def test_the_llama_peer_command_has_a_slot_per_stream_and_the_thread_count(tmp_path):
    from argparse import Namespace

    from bench.http_bench import llama_server

    args = Namespace(llama_server=Path("/opt/llama-server"), llama_gguf=Path("/m/f32.gguf"), levels=[1, 4],
                     max_tokens=128, spread=0.0, threads=1)
    server = llama_server(args, tmp_path)
    command = server.command
    assert command[:3] == ["/opt/llama-server", "-m", "/m/f32.gguf"]
    assert command[command.index("-np") + 1] == "4"
    assert int(command[command.index("-c") + 1]) >= 4 * (2 * 32 + 128)  # every slot holds prompt + max_tokens
    assert command[command.index("-t") + 1] == "1" and command[command.index("-tb") + 1] == "1"
    assert server.extra_body["ignore_eos"] is True and server.name == "llama"
    assert "-t" not in llama_server(Namespace(**{**vars(args), "threads": None}), tmp_path).command  # its own default
