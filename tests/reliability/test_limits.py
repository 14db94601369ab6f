"""Every per-request quantity bounded, refusals before the work, and CPU-heavy work off the event loop.

- A request that could never be admitted (more sequences than batch plus queue) is a 400, not a 429 that
  SDKs would retry forever.
- Admission reserves queue room before it tokenizes: a burst is refused while the admitted requests are
  still being tokenized, and prompts past ``max_prompt_chars`` / ``max_request_chars`` are never tokenized.
- ``/tokenize`` and ``/detokenize`` run off the event loop (``/health`` answers meanwhile), bounded in size.
- Prompt-logprob answers are bounded by ``max_logprob_entries``.
- A refusal quoting a 1 MB field is logged (and answered) in a short line.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.reliability.support import error_of, idle_client, serve
from tests.server.live import MODEL, wait_until

SLOTS, QUEUE = 2, 2


@pytest.fixture(scope="module")
def small(tiny_family):
    live, _ = serve(tiny_family, limits={"max_num_seqs": SLOTS, "max_waiting": QUEUE, "max_model_len": 64},
                    max_prompt_chars=1000, max_request_chars=1500, max_logprob_entries=200)
    yield live
    live.stop()


@pytest.fixture()
def http(small):
    with idle_client(small, timeout=120) as client:
        yield client


class HeldCalls:
    """Wraps an engine method: counts calls and holds each one until ``release`` (30 s at most)."""

    def __init__(self, owner, name: str, when=lambda *a, **k: True) -> None:
        self.owner, self.name, self.when = owner, name, when
        self.real = getattr(owner, name)
        self.calls = 0
        self.holding = threading.Event()
        self.released = threading.Event()

    def __call__(self, *args, **kwargs):
        if self.when(*args, **kwargs):
            self.calls += 1
            self.holding.set()
            self.released.wait(30)
        return self.real(*args, **kwargs)

    def __enter__(self) -> HeldCalls:
        setattr(self.owner, self.name, self)
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        setattr(self.owner, self.name, self.real)

    def release(self) -> None:
        self.released.set()


# ------------------------------------------------------------------------------------------------ admission
@pytest.mark.parametrize(("prompts", "n"), [(3, 2), (1, 5), (64, 16)])
def test_a_request_that_can_never_be_admitted_is_a_400(http, prompts, n):
    body = {"model": MODEL, "prompt": ["x"] * prompts if prompts > 1 else "x", "n": n, "max_tokens": 2}
    error = error_of(http.post("/v1/completions", json=body), 400)
    assert error["code"] == "request_too_large" and "max_num_seqs + max_waiting" in error["message"]
    assert error["param"] == "n"


def test_the_largest_request_that_fits_is_served(http):
    body = {"model": MODEL, "prompt": ["x", "y"], "n": 2, "max_tokens": 2}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_a_running_cap_from_static_kv_buffers_counts_in_admission(small, http, monkeypatch):
    """Where the engine's static K/V buffers hold fewer rows than max_num_seqs (on a GPU short of memory), the
    engine caps its running batch and reports the cap in its stats; the server's admission counts with it, so a
    request that only the config's larger batch would hold is a 400, not a 429 retried forever."""
    engine = small.engine.engine
    capped = engine.limits.model_copy(update={"max_num_seqs": SLOTS - 1})
    monkeypatch.setattr(engine, "limits", capped)
    monkeypatch.setattr(engine.scheduler, "limits", capped)
    assert small.engine.stats().max_num_seqs == SLOTS - 1
    body = {"model": MODEL, "prompt": ["x", "y"], "n": 2, "max_tokens": 2}  # 4 sequences: 1 + 2 hold 3
    error = error_of(http.post("/v1/completions", json=body), 400)
    assert error["code"] == "request_too_large" and "holds at most 3 at once" in error["message"]
    assert http.post("/v1/completions", json={**body, "n": 1}).status_code == 200


def test_admission_reserves_before_it_tokenizes(small):
    """Ten requests arrive while the first ones are still being tokenized (held): the queue's room (2 slots
    + 2 waiting) is reserved by the first four, the other six are refused at once, untokenized."""
    engine = small.engine.engine
    with HeldCalls(engine, "make_sequences") as held:
        with httpx.Client(base_url=small.url, timeout=120) as client, ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(client.post, "/v1/completions",
                                   json={"model": MODEL, "prompt": f"burst {i}", "max_tokens": 2}) for i in range(10)]
            assert wait_until(lambda: sum(f.done() for f in futures) >= 6, timeout=60)
            refused = [f.result() for f in futures if f.done()]
            calls_while_held = held.calls
            held.release()
            served = [f.result() for f in futures if f.result() not in refused]
    assert calls_while_held == SLOTS + QUEUE
    assert len(refused) == 6
    for response in refused:
        assert error_of(response, 429)["code"] == "server_overloaded"
    assert [r.status_code for r in served] == [200] * 4
    assert small.ctx.reserved == 0


@pytest.mark.parametrize(("path", "body", "param", "limit"), [
    ("/v1/completions", {"prompt": "a" * 1001}, "prompt", "max_prompt_chars"),
    ("/v1/completions", {"prompt": ["a" * 800, "b" * 800]}, "prompt", "max_request_chars"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 600}] * 2}, "messages",
     "max_prompt_chars"),
    ("/tokenize", {"prompt": "a" * 1001}, "prompt", "max_prompt_chars"),
])
def test_prompts_past_the_character_limits_are_refused_untokenized(small, http, path, body, param, limit):
    engine = small.engine.engine
    with HeldCalls(engine.models[0].renderer, "render") as spy:
        response = http.post(path, json={"model": MODEL, **body})
    error = error_of(response, 400)
    assert error["param"] == param and limit in error["message"] and error["code"] == "prompt_too_long"
    assert spy.calls == 0


# --------------------------------------------------------------------------------- off the event loop
def test_tokenize_runs_off_the_event_loop(small, http):
    """While a prompt is being tokenized (held here), ``/health`` and other requests are answered."""
    engine = small.engine.engine
    with HeldCalls(engine, "render") as held, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/tokenize", json={"model": MODEL, "prompt": "a long prompt"})
        assert held.holding.wait(30)
        health = httpx.get(f"{small.url}/health", timeout=10)
        held.release()
        tokenized = pending.result()
    assert health.status_code == 200
    assert tokenized.status_code == 200 and tokenized.json()["count"] > 0


def test_detokenize_runs_off_the_event_loop_and_is_bounded(small, http):
    engine = small.engine.engine
    with HeldCalls(engine.tokenizer, "decode", when=lambda ids, *a, **k: len(ids) == 5) as held, \
            ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/detokenize", json={"model": MODEL, "tokens": [5, 6, 7, 8, 9]})
        assert held.holding.wait(30)
        health = httpx.get(f"{small.url}/health", timeout=10)
        held.release()
        assert pending.result().status_code == 200
    assert health.status_code == 200
    error = error_of(http.post("/detokenize", json={"model": MODEL, "tokens": [1] * 65}), 400)
    assert error["param"] == "tokens" and "max_model_len" in error["message"]


# ------------------------------------------------------------------------------------- response size
def test_prompt_logprobs_past_the_limit_are_refused(http):
    """prompt tokens x choices x (1 + logprobs) entries: 20 x 2 x 6 = 240 > 200 here."""
    prompt = list(range(1, 21))
    body = {"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 5, "max_tokens": 0, "n": 2}
    error = error_of(http.post("/v1/completions", json=body), 400)
    assert "max_logprob_entries" in error["message"] and "240" in error["message"]
    fits = http.post("/v1/completions", json={**body, "n": 1})  # 120 entries
    assert fits.status_code == 200
    assert len(fits.json()["choices"][0]["logprobs"]["tokens"]) == 20
    streamed = http.post("/v1/completions", json={**body, "n": 1, "stream": True})
    assert streamed.status_code == 200 and '"top_logprobs"' in streamed.text


# --------------------------------------------------------------------------------------------- logging
def test_refusals_are_logged_short(http, caplog):
    huge = "m" * 1_000_000
    with caplog.at_level(logging.INFO, logger="proxy_serve"):
        response = http.post("/v1/completions", json={"model": huge, "prompt": "x"})
        bias = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logit_bias": {huge: 1}})
    assert len(error_of(response, 404)["message"]) < 500
    assert len(error_of(bias, 400)["message"]) < 500
    lines = [r.getMessage() for r in caplog.records]
    assert lines and max(len(line) for line in lines) < 1000
