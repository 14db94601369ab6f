"""A browser page on another origin calling the API directly (Open WebUI's "direct connections", or any
frontend's browser code with the ``openai`` JS SDK): the preflight needs no key, and every answer, errors and
event streams included, carries the CORS headers the browser needs to let the page read it."""

from __future__ import annotations

import json

import pytest

from tests.frontends.calls import BROWSER_ORIGIN, MODEL, OPENAI_NODE_HEADERS, bearer, openai_node_events

# What a browser adds to a cross-origin fetch; the openai SDK in a browser adds its x-stainless-* headers.
BROWSER = {"origin": BROWSER_ORIGIN, "referer": f"{BROWSER_ORIGIN}/", "sec-fetch-mode": "cors",
           "sec-fetch-site": "same-site"}
SDK_HEADERS = sorted(k for k in OPENAI_NODE_HEADERS if k.startswith("x-stainless-"))


def _preflight(http, path: str, method: str, request_headers: str, origin: str = BROWSER_ORIGIN):
    return http.options(path, headers={
        **BROWSER, "origin": origin, "access-control-request-method": method,
        "access-control-request-headers": request_headers,
    })


@pytest.mark.parametrize(("path", "method", "request_headers"), [
    ("/v1/models", "GET", "authorization,content-type"),  # Open WebUI direct connection: Accept is safelisted
    ("/v1/chat/completions", "POST", "authorization,content-type"),
    ("/v1/chat/completions", "POST", ",".join(["authorization", "content-type", *SDK_HEADERS])),
])
def test_preflight_is_answered_without_a_key(http, path, method, request_headers):
    response = _preflight(http, path, method, request_headers)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == BROWSER_ORIGIN
    assert method in response.headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert set(request_headers.split(",")) <= allowed
    assert "origin" in response.headers.get("vary", "").lower()


def test_preflight_from_another_origin_is_refused(http):
    response = _preflight(http, "/v1/models", "GET", "authorization", origin="http://evil.example")
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers


def test_model_list_from_the_browser(http):
    response = http.get("/v1/models", headers=bearer({**BROWSER, "accept": "application/json",
                                                      "content-type": "application/json"}))
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == BROWSER_ORIGIN
    assert response.json()["data"][0]["id"] == MODEL


def test_errors_are_readable_from_the_browser(http):
    """A wrong key must reach the page as the 401 body, not as an opaque CORS failure."""
    response = http.get("/v1/models", headers=bearer({**BROWSER, "accept": "application/json"}, key="sk-wrong"))
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == BROWSER_ORIGIN
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_streamed_chat_from_the_browser(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": 8}
    headers = bearer({**BROWSER, **OPENAI_NODE_HEADERS})
    with http.stream("POST", "/v1/chat/completions", content=json.dumps(body), headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == BROWSER_ORIGIN
        assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
        text = "".join(response.iter_text())
    chunks, done = openai_node_events(text)
    assert done and chunks[-1]["usage"]["completion_tokens"] <= 8


def test_non_streamed_chat_and_refusals_from_the_browser(http):
    headers = bearer({**BROWSER, "content-type": "application/json"})
    ok = http.post("/v1/chat/completions", headers=headers, content=json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Name this chat."}], "max_tokens": 8}))
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == BROWSER_ORIGIN
    missing = http.post("/v1/chat/completions", headers=headers, content=json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
    assert missing.status_code == 404 and missing.headers["access-control-allow-origin"] == BROWSER_ORIGIN
