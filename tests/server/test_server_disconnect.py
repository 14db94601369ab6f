"""A client that leaves mid-stream has its request aborted in the engine; other clients are unaffected."""

from __future__ import annotations

import json
import threading

import httpx

from tests.server.live import MODEL, wait_until

LONG = {"model": MODEL, "prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True}


def test_disconnect_mid_stream_aborts_the_request(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=LONG) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in received)
            assert live.engine.stats().running == 1
    # The connection is closed: the engine must drop the sequence long before its 400 tokens.
    assert wait_until(live.idle)
    assert 'endpoint="completions",model="proxy-tuned",status="disconnected"' in httpx.get(f"{live.url}/metrics").text


def test_one_client_leaving_does_not_stop_another(live):
    steady_result: dict = {}

    def steady() -> None:
        body = {"model": MODEL, "prompt": "Steady", "max_tokens": 40, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as response:
            steady_result["events"] = [line for line in response.iter_lines() if line.startswith("data: ")]

    with httpx.Client(base_url=live.url, timeout=60) as leaver:
        with leaver.stream("POST", "/v1/completions", json=LONG) as response:
            lines = response.iter_lines()
            next(lines)
            thread = threading.Thread(target=steady)
            thread.start()
            assert wait_until(lambda: live.engine.stats().running == 2 or not thread.is_alive())
    thread.join(timeout=60)
    events = steady_result["events"]
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] == 40
    finals = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-2]]
    assert [r for r in finals if r] == ["length"]
    assert wait_until(live.idle)


def test_chat_disconnect_mid_stream(live):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "n": 2,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(8):
            next(lines)
    assert wait_until(live.idle)
