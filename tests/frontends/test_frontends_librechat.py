"""LibreChat's calls, replayed byte for byte against a real server (LibreChat itself needs MongoDB and its Node
stack, which this suite does not run): the model fetch, streamed chat from its agents endpoint (LangChain)
and from its older OpenAIClient, title generation by both, and ``addParams: {alpha}``."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import load_settings
from tests.frontends.calls import (
    API_KEY,
    BASE_MODEL,
    EXPERT_MODEL,
    LANGCHAIN_HEADERS,
    LIBRECHAT_AGENTS_STREAM,
    LIBRECHAT_AGENTS_TITLE,
    LIBRECHAT_LEGACY_STREAM,
    LIBRECHAT_LEGACY_TITLE,
    MODEL,
    OPENAI_NODE_HEADERS,
    ChatCompletionAccumulator,
    StreamAPIError,
    bearer,
    fill_context,
    open_webui_events,
    openai_node_events,
)
from tests.server.fake_engine import FakeEngine


def _post(http, body: dict, headers: dict) -> tuple[int, dict[str, str], str]:
    """Sends ``body`` serialised as the Node SDK does (``JSON.stringify``: compact, key order kept)."""
    payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    with http.stream("POST", "/v1/chat/completions", content=payload, headers=headers) as response:
        text = "".join(response.iter_text())
        return response.status_code, dict(response.headers), text


def test_model_fetch(http):
    """``models.fetch: true``: GET {baseURL}/models with the key; LibreChat keeps ``data[].id``."""
    response = http.get("/v1/models", headers=bearer({"accept": "application/json"}))
    assert response.status_code == 200
    ids = [model["id"] for model in response.json()["data"]]
    assert ids == [MODEL, BASE_MODEL, EXPERT_MODEL]


def test_model_fetch_with_a_wrong_key_is_an_openai_error(http):
    response = http.get("/v1/models", headers=bearer({"accept": "application/json"}, key="sk-wrong"))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("body", [LIBRECHAT_AGENTS_STREAM, LIBRECHAT_LEGACY_STREAM], ids=["agents", "legacy"])
def test_streamed_chat(http, body):
    """No ``max_tokens`` (or null): the reply runs to the end of the context (kept short by a long message)."""
    status, headers, text = _post(http, fill_context(http, body), bearer(LANGCHAIN_HEADERS))
    assert status == 200, text
    assert headers["content-type"].startswith("text/event-stream")
    chunks, done = openai_node_events(text)
    assert done
    accumulator = ChatCompletionAccumulator()
    for chunk in chunks:
        accumulator.add(chunk)
    final = accumulator.final()  # raises as finalChatCompletion() would on a missing role / finish_reason
    assert final["model"] == MODEL
    (choice,) = final["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    if body.get("stream_options", {}).get("include_usage"):
        # LangChain reads usage from the last chunk (choices: []); every other chunk says usage: null.
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
        assert all(chunk["usage"] is None for chunk in chunks[:-1])
    else:
        assert final["usage"] is None and all("usage" not in chunk for chunk in chunks)


@pytest.mark.parametrize("body", [LIBRECHAT_AGENTS_TITLE, LIBRECHAT_LEGACY_TITLE], ids=["agents", "legacy"])
def test_title_generation(http, body):
    """Titles are non-streamed; LibreChat reads ``choices[0].message.content`` and strips quotes."""
    status, headers, text = _post(http, body, bearer(OPENAI_NODE_HEADERS))
    assert status == 200, text
    assert headers["content-type"].startswith("application/json")
    completion = json.loads(text)
    assert completion["object"] == "chat.completion"
    assert completion["model"] == EXPERT_MODEL
    message = completion["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str) and message["content"]
    assert completion["usage"]["completion_tokens"] <= body["max_tokens"]


def test_add_params_alpha_reaches_the_engine(http):
    """``addParams: {alpha: 0}`` on the proxy-tuned id answers exactly what the base alone answers (greedy)."""
    def greedy(model: str, **extra) -> str:
        body = {**LIBRECHAT_AGENTS_STREAM, "model": model, "temperature": 0, "max_tokens": 12, **extra}
        body.pop("top_p")
        status, _, text = _post(http, body, bearer(LANGCHAIN_HEADERS))
        assert status == 200, text
        chunks, done = openai_node_events(text)
        assert done
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    assert greedy(MODEL, alpha=0) == greedy(BASE_MODEL)
    assert greedy(MODEL, alpha=[0.0]) == greedy(BASE_MODEL)


def test_unsupported_content_is_a_400_before_the_stream(http):
    """An image part (vision models) is refused with an OpenAI error LibreChat shows, not a broken stream."""
    body = {**LIBRECHAT_AGENTS_STREAM, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "auto"}},
    ]}]}
    status, headers, text = _post(http, body, bearer(LANGCHAIN_HEADERS))
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert "image_url" in json.loads(text)["error"]["message"]


def test_engine_error_mid_stream_is_thrown_by_the_sdk_parser():
    """An engine failure after the 200 reaches LibreChat as the SDK's APIError (not a silent cut-off)."""
    fake = FakeEngine(fail_at_token=2)
    engine = {"base": {"path": "b"}, "experts": [{"expert": {"path": "e"}, "anti_expert": {"path": "a"}}]}
    settings = load_settings(overrides={"engine": engine, "api_keys": [API_KEY]}, environ=False)
    with TestClient(create_app(fake, settings), base_url="http://localhost") as client:
        client.portal.call(asyncio.sleep, 0.05)  # let the background load finish
        body = {**LIBRECHAT_AGENTS_STREAM, "max_tokens": 5}
        payload = json.dumps(body, separators=(",", ":")).encode()
        with client.stream("POST", "/v1/chat/completions", content=payload,
                           headers=bearer(LANGCHAIN_HEADERS)) as response:
            assert response.status_code == 200
            text = "".join(response.iter_text())
    with pytest.raises(StreamAPIError, match="request id") as caught:
        openai_node_events(text)
    assert caught.value.error["type"] == "server_error"
    with pytest.raises(StreamAPIError, match="request id"):
        open_webui_events(text)


def test_top_p_zero_from_the_slider_is_the_most_likely_token(http):
    """LibreChat's top_p slider reaches 0, which OpenAI reads as "only the most likely token": greedy output."""
    def reply(**sampling) -> str:
        body = {**LIBRECHAT_AGENTS_STREAM, "max_tokens": 12, **sampling}
        status, _, text = _post(http, body, bearer(LANGCHAIN_HEADERS))
        assert status == 200, text
        chunks, _ = openai_node_events(text)
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    assert reply(top_p=0, temperature=0.7) == reply(top_p=1, temperature=0)
