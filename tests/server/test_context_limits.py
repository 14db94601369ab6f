"""max_tokens past the context left is a 400 naming the lengths (OpenAI's and vLLM's answer), never clamped;
a missing max_tokens still means "up to the context left" (tests/engine/test_context_limits.py)."""

from __future__ import annotations

import pytest

from tests.server.live import MODEL


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("max_tokens", [10**12, 600])
def test_max_tokens_past_the_context_is_a_400_naming_the_lengths(http, endpoint, max_tokens):
    body = {"model": MODEL, "max_tokens": max_tokens}
    body.update({"prompt": "Hello"} if endpoint == "/v1/completions" else
                {"messages": [{"role": "user", "content": "Hello"}]})
    response = http.post(endpoint, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in error["message"]
    assert f"{max_tokens} in max_tokens" in error["message"]


def test_a_full_context_prompt_with_max_tokens_names_both(http):
    """lm-evaluation-harness sends a window of the full context with max_tokens 1 (and echo)."""
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 512, "max_tokens": 1,
                                                   "echo": True, "logprobs": 0})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "you requested 513 tokens (512 in the prompt" in message and "1 in max_tokens" in message
    scored = http.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 512, "max_tokens": 0, "echo": True,
                                                "logprobs": 0})
    assert scored.status_code == 200, scored.text


def test_max_tokens_that_fit_exactly_are_served(http):
    prompt = [5] * 500
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                                  "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 12
