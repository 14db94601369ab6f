"""An exception inside the engine step fails the requests it concerns with a 500-shaped error naming the request
id, logs one traceback, and the engine goes on serving everyone else.

Faults are injected through ``ProxyEngine.fault_hook`` (phases "prefill", "decode", "sample") of an
in-process server, keyed on a request's ``seed`` so that only the poisoned request triggers them.
"""

from __future__ import annotations

import json
import logging
import threading

import httpx
import pytest

from tests.reliability.support import (
    Gate,
    choice_tokens,
    error_of,
    finish_reasons,
    idle_client,
    raise_for_seed,
    served,
    stream,
    stream_error,
)
from tests.server.live import MODEL, wait_until

POISON = 66_613
LONG = {"model": MODEL, "prompt": "Steady", "max_tokens": 24, "ignore_eos": True, "logprobs": 0,
        "stream_options": {"include_usage": True}}


class BadLogitBias(IndexError):
    """What a logit_bias index past the logits would raise deep in the sampler."""


@pytest.fixture(scope="module")
def server(tiny_family):
    with served(tiny_family, limits={"max_num_seqs": 8}) as live:
        yield live


@pytest.fixture()
def http(server):
    with idle_client(server) as client:
        yield client


def tracebacks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info]


def test_prefill_fault_fails_only_that_request_while_another_streams(server, http, caplog):
    """The poisoned request joins while an innocent one is mid-stream: only the poisoned one fails."""
    gate = Gate("decode")
    innocent: dict = {}

    def run_innocent() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            innocent["status"], innocent["events"] = stream(client, "/v1/completions", LONG)

    with server.hooks.on(gate):
        thread = threading.Thread(target=run_innocent)
        thread.start()
        assert gate.holding.wait(30)  # the innocent request is running (prefilled, now decoding)
        with server.hooks.on(raise_for_seed(POISON, "prefill", lambda: BadLogitBias("index 70000 is out of "
                                                                                       "bounds"))):
            gate.open()
            with caplog.at_level(logging.INFO):
                response = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "seed": POISON,
                                                              "max_tokens": 4})
        thread.join(60)
    error = error_of(response, 500)
    request_id = response.headers["x-request-id"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert request_id in error["message"] and "BadLogitBias" in error["message"]
    assert len(tracebacks(caplog)) == 1  # the engine's, once; the server adds one plain line per request
    assert any(request_id in r.getMessage() for r in caplog.records if r.name == "proxy_serve")
    # The innocent stream went on and got everything.
    events = innocent["events"]
    assert innocent["status"] == 200 and events[-1] == "[DONE]" and stream_error(events) is None
    assert choice_tokens(events) == {0: 24} and finish_reasons(events) == {0: ["length"]}
    assert events[-2]["usage"]["completion_tokens"] == 24


@pytest.mark.parametrize("phase", ["decode", "sample"])
def test_fault_mid_stream_is_an_error_event_then_done(server, http, caplog, phase):
    """A fault after the 200 went out (an out-of-memory, here): an error event naming the request id, then
    ``[DONE]``. In the "sample" phase a few tokens get out first."""
    for path, body in (("/v1/completions", {"prompt": "x", "logprobs": 0}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True})):
        rule = raise_for_seed(POISON, phase, lambda: MemoryError("simulated out of memory"), after=3)
        with server.hooks.on(rule), caplog.at_level(logging.INFO):
            status, events = stream(http, path, {"model": MODEL, **body, "seed": POISON, "max_tokens": 30,
                                                 "ignore_eos": True})
        assert status == 200
        error = stream_error(events)
        assert error is not None and error["type"] == "server_error" and error["code"] == "internal_error"
        assert "MemoryError" in error["message"] and http.last_request_id in error["message"]
        assert 0 < choice_tokens(events).get(0, 0) < 30  # some tokens, then the error
    assert len(tracebacks(caplog)) == 2  # one per failed step, none from the server


def test_engine_keeps_serving_after_faults(server, http):
    """After each kind of fault, the next requests are served in full and nothing is left in the batch."""
    for phase in ("prefill", "decode", "sample"):
        with server.hooks.on(raise_for_seed(POISON, phase, lambda: RuntimeError("boom"))):
            failed = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "seed": POISON,
                                                        "max_tokens": 5, "ignore_eos": True})
            assert error_of(failed, 500)["code"] == "internal_error"
            ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2, "max_tokens": 5,
                                                    "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 10
        assert wait_until(server.idle)
    assert server.engine.ready


def test_every_sequence_of_a_failed_request_is_released(server, http):
    """``n`` sequences fail together and all leave the engine (nothing running or waiting afterwards)."""
    with server.hooks.on(raise_for_seed(POISON, "decode", lambda: RuntimeError("boom"))):
        status, events = stream(http, "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 4, "seed": POISON,
            "max_tokens": 20, "ignore_eos": True})
    assert status == 200 and stream_error(events)["code"] == "internal_error"
    assert wait_until(server.idle)
    metrics = http.get("/metrics").text
    assert 'status="error"' in metrics


def test_tgi_routes_fail_in_tgis_shape(server, http, caplog):
    """TGI's API (server/tgi.py): a fault before anything was sent is a 424 ``generation`` error naming the
    request id; after the 200 went out, the stream's last event is ``{"error", "error_type": "generation"}``."""
    parameters = {"seed": POISON, "do_sample": True, "max_new_tokens": 30}
    with server.hooks.on(raise_for_seed(POISON, "prefill", lambda: RuntimeError("boom"))), \
            caplog.at_level(logging.INFO):
        response = http.post("/generate", json={"inputs": "x", "parameters": parameters})
    assert response.status_code == 424
    body = response.json()
    assert body["error_type"] == "generation" and response.headers["x-request-id"] in body["error"]
    rule = raise_for_seed(POISON, "sample", lambda: MemoryError("simulated out of memory"), after=3)
    with server.hooks.on(rule), http.stream("POST", "/generate_stream",
                                            json={"inputs": "x", "parameters": parameters}) as streamed:
        assert streamed.status_code == 200
        events = [json.loads(line[len("data:"):]) for line in streamed.iter_lines() if line]
    assert 0 < len(events) - 1 < 30 and all("token" in e for e in events[:-1])
    assert events[-1]["error_type"] == "generation" and "MemoryError" in events[-1]["error"]
    assert streamed.headers["x-request-id"] in events[-1]["error"]
    assert wait_until(server.idle)
