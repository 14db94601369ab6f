"""A server whose K/V budget holds fewer streams than its clients send at once: every stream still completes, with
the text an unbounded server gives, while the budget preempts and defers behind it; /metrics shows the budget."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.reliability.support import idle_client, served


def _stream(url: str, prompt: str) -> str:
    body = {"model": "proxy-tuned", "prompt": prompt, "max_tokens": 150, "temperature": 0, "stream": True,
            "ignore_eos": True}
    text, done = "", False
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
    assert done
    return text


PROMPTS = ["Once upon a time", "The quick brown fox", "Paris is the capital of", "def add(a, b):"]


def _texts(live) -> list[str]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(lambda prompt: _stream(live.url, prompt), PROMPTS))


def test_streams_over_the_kv_budget_complete_as_they_would_without_it(tiny_family):
    with served(tiny_family) as free:
        unbounded = _texts(free)
        per_token = free.engine.engine.kv_bytes_per_token
    limit = sum(640 * per for per in per_token)  # four rows of 128 columns in every model, not of 192
    with served(tiny_family, runtime={"kv_cache_memory": limit}) as live:
        assert _texts(live) == unbounded
        with idle_client(live) as client:
            metrics = client.get("/metrics").text
        engine = live.engine.engine
        assert engine.scheduler.preemptions_total > 0  # the budget, not the batch size, held the streams back
        assert engine.kv_memory["cpu"].limit == limit
    assert f'proxy_serve_kv_budget_bytes{{device="cpu"}} {float(limit)}' in metrics
    assert "proxy_serve_kv_budget_used_bytes" in metrics
