"""Every error is OpenAI-shaped, with the right status: 400, 401, 404, 413, 429, 500, 503."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from server.protocol import ChatCompletionRequest, CompletionRequest
from tests.server.live import API_KEY, MODEL, ORIGIN, wait_until


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "n": [1]}, "n"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": ["a", [1, "b"]]}, "prompt"),
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"prompt": {"text": "a"}}, "prompt"),
        ({"prompt": "x", "logit_bias": {"foo": 1}}, "logit_bias"),
    ],
)
def test_bad_completion_parameters_are_400(http, body, param):
    error = _error(http.post("/v1/completions", json={"model": MODEL, **body}), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "alpha": [1, 2]}, "alpha"),
        ({"prompt": "x", "alpha": 1000}, "alpha"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
        ({"prompt": "x", "min_p": 1.5}, "min_p"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "x", "top_k": -2}, "top_k"),
        ({"prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
        ({"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids"),
        ({"prompt": "x", "logit_bias": {"5": 200}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias"),
        ({"prompt": [999999]}, "prompt"),
    ],
)
def test_out_of_range_values_are_400_naming_the_field(http, body, param):
    assert _error(http.post("/v1/completions", json={"model": MODEL, **body}), 400)["param"] == param


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        [{"role": "wizard", "content": "hi"}],
        [{"role": "tool", "content": "42"}],
        [],
        "hello",
    ],
)
def test_bad_chat_messages_are_400(http, messages):
    _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}), 400)


# What clients really send for each field the server would not honour (protocol.UNHONOURED).
_UNHONOURED_VALUES = {
    "logits_processors": ["my_module.MyProcessor"],
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "web_search_options": {},
    "moderation": {"model": "omni-moderation-latest", "policy": {"output": {"mode": "block"}}},
    "documents": [{"title": "a", "text": "b"}],
    "thinking_token_budget": 512,
}


@pytest.mark.parametrize("field", sorted(ChatCompletionRequest.UNHONOURED))
def test_a_chat_field_that_would_change_the_answer_is_refused_not_dropped(http, field):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], field: _UNHONOURED_VALUES[field]}
    error = _error(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == field and error["message"].startswith(f"{field} is not supported: ")


@pytest.mark.parametrize("field", sorted(CompletionRequest.UNHONOURED))
def test_a_completions_field_that_would_change_the_answer_is_refused_not_dropped(http, field):
    body = {"model": MODEL, "prompt": "x", field: _UNHONOURED_VALUES[field]}
    assert _error(http.post("/v1/completions", json=body), 400)["param"] == field


def test_values_of_those_fields_that_ask_for_nothing_more_are_accepted(http):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "modalities": ["text"],
            "use_beam_search": False, "audio": None, "echo": False, "prompt_logprobs": None}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    # LangChain sends best_of 1 whatever n is; best_of == n asks for no extra candidates either.
    for n, best_of in ((1, 1), (2, 1), (2, 2)):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1, "n": n, "best_of": best_of}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200 and len(response.json()["choices"]) == n


def test_best_of_above_n_is_refused(http):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1, "n": 1, "best_of": 3}
    error = _error(http.post("/v1/completions", json=body), 400)
    assert error["param"] == "best_of" and "best_of 3, n 1" in error["message"]


def test_top_logprobs_without_logprobs_is_400(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    assert _error(http.post("/v1/chat/completions", json=body), 400)["param"] == "top_logprobs"
    for count in (21, -1):
        error = _error(http.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": count}), 400)
        assert error["param"] == "top_logprobs" and error["message"].startswith("top_logprobs must be between 0 and 20")


def test_malformed_json_is_400(http):
    for raw in (b'{"prompt": "x",', b"not json", b"[1, 2]"):
        response = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        _error(response, 400)
    assert "malformed JSON" in http.post("/v1/completions", content=b"{", headers={
        "content-type": "application/json"}).json()["error"]["message"]


def test_unknown_model_is_404(http):
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "x"}]})):
        error = _error(http.post(path, json={"model": "gpt-4o", **body}), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"
    _error(http.get("/v1/models/gpt-4o"), 404)


def test_missing_model_means_the_proxy_model(http):
    response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert response.status_code == 200 and response.json()["model"] == MODEL


def test_unknown_route_and_method_are_shaped(http):
    _error(http.get("/v1/nothing"), 404)
    _error(http.delete("/v1/models"), 405)


def test_prompt_past_the_context_is_400_with_both_lengths(http):
    prompt = "Paris is the capital of France. " * 120
    count = http.post("/tokenize", json={"prompt": prompt}).json()
    assert count["count"] > count["max_model_len"]
    error = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": prompt}), 400)
    assert str(count["max_model_len"]) in error["message"] and str(count["count"]) in error["message"]


def test_missing_or_bad_key_is_401(guarded):
    url = f"{guarded.url}/v1/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": "Basic x"}):
        error = _error(httpx.get(url, headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    ok = httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200
    assert ok.headers.get("access-control-allow-origin") is None  # no Origin sent
    for path in ("/health", "/ping", "/metrics", "/version"):
        assert httpx.get(f"{guarded.url}{path}").status_code == 200
    assert httpx.post(f"{guarded.url}/ping").status_code == 200  # vLLM's probe, GET or POST


def test_preflight_needs_no_key_and_allows_authorization(guarded):
    response = httpx.options(f"{guarded.url}/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    simple = httpx.get(f"{guarded.url}/v1/models", headers={"Origin": ORIGIN})
    _error(simple, 401)
    assert simple.headers["access-control-allow-origin"] == ORIGIN  # the browser can read the 401
    other = httpx.options(f"{guarded.url}/v1/models", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert other.headers.get("access-control-allow-origin") != "http://evil.example"


def test_body_over_the_limit_is_413(guarded):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    big = {"model": MODEL, "prompt": "x" * (20 * 1024)}
    error = _error(httpx.post(f"{guarded.url}/v1/completions", json=big, headers=headers), 413)
    assert error["code"] == "request_too_large"

    def chunks():
        yield json.dumps(big).encode()

    chunked = httpx.post(f"{guarded.url}/v1/completions", content=chunks(), headers={
        **headers, "content-type": "application/json"})
    _error(chunked, 413)  # no Content-Length: counted as it arrives


def test_overload_is_429_with_retry_after(guarded):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    long_body = {"model": MODEL, "prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=guarded.url, headers=headers, timeout=60) as first:
        with first.stream("POST", "/v1/completions", json=long_body) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")  # the long request holds the only slot
            second = httpx.post(f"{guarded.url}/v1/completions", json={"model": MODEL, "prompt": "x"},
                                headers=headers)
            error = _error(second, 429)
            assert int(second.headers["retry-after"]) >= 1
            assert error["type"] == "rate_limit_error"


def test_non_streaming_disconnect_is_aborted(live):
    """A client that leaves a non-streaming request frees its slot: the engine goes idle again."""
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 400, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert wait_until(lambda: live.engine.stats().running == 1)
    assert wait_until(live.idle)
    assert 'status="disconnected"' in httpx.get(f"{live.url}/metrics").text
