"""Admission control and per-request timeouts.

- Past ``limits.max_waiting`` a request is refused at once with 429 and ``Retry-After``, and the requests
  already admitted are not disturbed: they complete with all their tokens. The engine is held still (a gate
  in its decode phase) while the burst arrives, so the refusals are shown to need no engine step at all.
- Under ``scheduling_policy: priority`` an urgent request preempts a running stream, which resumes losing
  nothing.
- ``limits.request_timeout_s`` ends a request cleanly: an error event with code ``timeout`` when streaming,
  a 504 with type ``timeout`` otherwise, whether the request was running or still waiting.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.reliability.support import (
    Gate,
    choice_tokens,
    error_of,
    finish_reasons,
    idle,
    served,
    stream,
    stream_error,
)
from tests.server.live import MODEL, wait_until

SLOTS, QUEUE = 2, 2
TOKENS = 20


@pytest.fixture(scope="module")
def small(tiny_family):
    """Room for two running sequences and two waiting ones."""
    with served(tiny_family, limits={"max_num_seqs": SLOTS, "max_waiting": QUEUE}) as live:
        yield live


def test_burst_past_the_queue_is_refused_at_once_and_admitted_streams_complete(small):
    gate = Gate("decode")
    results: list = [None] * (SLOTS + QUEUE)

    def admitted(i: int) -> None:
        body = {"model": MODEL, "prompt": f"request {i}", "max_tokens": TOKENS, "ignore_eos": True, "logprobs": 0,
                "stream_options": {"include_usage": True}}
        with httpx.Client(base_url=small.url, timeout=120) as client:
            results[i] = stream(client, "/v1/completions", body)

    with small.hooks.on(gate):
        threads = [threading.Thread(target=admitted, args=(i,)) for i in range(SLOTS + QUEUE)]
        for thread in threads:
            thread.start()

        def all_admitted() -> bool:
            stats = small.engine.stats()
            return stats.running + stats.prefilling + stats.waiting == SLOTS + QUEUE

        assert wait_until(all_admitted, timeout=60) and gate.holding.wait(30)
        # The engine stands still now. A burst of 24, streamed and not, chat and completions:
        bodies = [("/v1/completions", {"prompt": "burst", "max_tokens": 5, "stream": i % 2 == 0}) if i % 3 else
                  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "burst"}], "stream": i % 2 == 0})
                  for i in range(24)]
        with httpx.Client(base_url=small.url, timeout=30) as client, ThreadPoolExecutor(8) as pool:
            refusals = list(pool.map(lambda pb: client.post(pb[0], json={"model": MODEL, **pb[1]}), bodies))
        stats_during = small.engine.stats()
        gate.open()
        for thread in threads:
            thread.join(120)

    for response in refusals:  # every one refused while the engine had not moved
        error = error_of(response, 429)
        assert error["type"] == "rate_limit_error" and error["code"] == "server_overloaded"
        assert int(response.headers["retry-after"]) >= 1
    assert stats_during.running + stats_during.prefilling + stats_during.waiting == SLOTS + QUEUE
    for status, events in results:  # and the admitted ones got everything
        assert status == 200 and events[-1] == "[DONE]" and stream_error(events) is None
        assert choice_tokens(events) == {0: TOKENS} and finish_reasons(events) == {0: ["length"]}
        assert events[-2]["usage"]["completion_tokens"] == TOKENS
    assert idle(small)
    metrics = httpx.get(f"{small.url}/metrics").text
    assert 'status="429"' in metrics


def test_room_again_after_the_queue_drains(small):
    with httpx.Client(base_url=small.url, timeout=60) as client:
        response = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})
    assert response.status_code == 200


# ------------------------------------------------------------------------------------------------ timeouts
TIMEOUT_S = 1.5
SLOW = 424_242  # requests with this seed are held in decode until their deadline has passed


def hold_until_deadline(phase: str, sequences: list) -> None:
    marked = [s for s in sequences if s.params.seed == SLOW and s.deadline is not None]
    if phase == "decode" and marked:
        deadline = max(s.deadline for s in marked)
        while time.monotonic() <= deadline + 0.05:
            time.sleep(0.01)


@pytest.fixture(scope="module")
def timed(tiny_family):
    """``request_timeout_s`` set; one running sequence at a time, so a second request waits."""
    with served(tiny_family, limits={"request_timeout_s": TIMEOUT_S, "max_num_seqs": 1}) as live:
        yield live


def test_timeout_while_streaming_is_an_error_event_with_code_timeout(timed):
    body = {"model": MODEL, "prompt": "x", "seed": SLOW, "max_tokens": 50, "ignore_eos": True}
    with timed.hooks.on(hold_until_deadline), httpx.Client(base_url=timed.url, timeout=60) as client:
        for path, extra in (("/v1/completions", {}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            request = {k: v for k, v in {**body, **extra}.items() if not (extra and k == "prompt")}
            status, events = stream(client, path, request)
            assert status == 200
            error = stream_error(events)
            assert error is not None, events[-3:]
            assert error["code"] == "timeout" and error["type"] == "timeout"
            assert "timed out" in error["message"] and client.last_request_id in error["message"]
    assert idle(timed)


def test_timeout_without_streaming_is_504(timed):
    with timed.hooks.on(hold_until_deadline), httpx.Client(base_url=timed.url, timeout=60) as client:
        response = client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "seed": SLOW, "max_tokens": 50,
            "ignore_eos": True})
    error = error_of(response, 504)
    assert error["type"] == "timeout" and error["code"] == "timeout"
    assert response.headers["x-request-id"] in error["message"]
    assert idle(timed)


def test_a_request_that_times_out_while_waiting(timed):
    """The only slot is held past the deadlines: the waiting request times out too, without ever running."""
    gate = Gate("decode")
    with timed.hooks.on(gate), httpx.Client(base_url=timed.url, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        holder = pool.submit(client.post, "/v1/completions", json={
            "model": MODEL, "prompt": "x", "max_tokens": 50, "ignore_eos": True})
        assert gate.holding.wait(30)
        waiter = pool.submit(client.post, "/v1/completions", json={"model": MODEL, "prompt": "y", "max_tokens": 3})
        assert wait_until(lambda: timed.engine.stats().waiting == 1)
        time.sleep(TIMEOUT_S + 0.1)  # both deadlines are behind us now
        gate.open()
        responses = holder.result(), waiter.result()
    for response in responses:
        assert error_of(response, 504)["code"] == "timeout"
    assert idle(timed)
    metrics = httpx.get(f"{timed.url}/metrics").text
    assert 'status="timeout"' in metrics


# ------------------------------------------------------------------------------------------------ preemption
@pytest.fixture(scope="module")
def by_priority(tiny_family):
    """One running sequence at a time, the waiting queue in priority order (a more urgent request preempts)."""
    with served(tiny_family, limits={"max_num_seqs": 1, "scheduling_policy": "priority"}) as live:
        yield live


def test_an_urgent_request_preempts_a_stream_which_then_ends_as_if_never_interrupted(by_priority):
    slow = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "priority": 5, "logprobs": 0, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=by_priority.url, timeout=120) as client:
        alone = client.post("/v1/completions", json=slow).json()
    result: list = []

    def stream_slow() -> None:
        with httpx.Client(base_url=by_priority.url, timeout=120) as client:
            result.append(stream(client, "/v1/completions", slow))

    gate = Gate("decode")
    with by_priority.hooks.on(gate):
        thread = threading.Thread(target=stream_slow)
        thread.start()
        assert gate.holding.wait(30)  # "slow" holds the one slot, its first token out
        urgent = ThreadPoolExecutor(1).submit(lambda: httpx.post(
            f"{by_priority.url}/v1/chat/completions", timeout=120, json={
                "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "priority": -1}))
        assert wait_until(lambda: by_priority.engine.stats().waiting == 1, timeout=30)
        gate.open()
        assert urgent.result(120).status_code == 200
        thread.join(120)
    status, events = result[0]
    assert status == 200 and stream_error(events) is None and events[-1] == "[DONE]"
    text = "".join(c["text"] for e in events if isinstance(e, dict) for c in e.get("choices", []))
    assert text == alone["choices"][0]["text"] and choice_tokens(events) == {0: 16}
    assert events[-2]["usage"] == alone["usage"]  # the prompt counted once, though it was prefilled twice
    assert idle(by_priority)  # the urgent request had the slot while "slow" waited (it was preempted once):
    assert "proxy_serve_num_preemptions_total 1.0" in httpx.get(f"{by_priority.url}/metrics").text
