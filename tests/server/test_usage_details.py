"""OpenAI's usage details: ``prompt_tokens_details.cached_tokens``, the prompt tokens read from the prefix cache
instead of computed (in the model that reports usage), counted once per prompt whatever ``n``."""

from __future__ import annotations

import uuid

from tests.server.live import MODEL

BLOCK = 16  # the live server's prefix-cache block size (the default)


def _usage(http, path: str, **body) -> dict:
    answer = http.post(path, json={"model": MODEL, "max_tokens": 1, **body})
    assert answer.status_code == 200, answer.text
    return answer.json()["usage"]


def test_a_repeated_prompt_reports_its_cached_blocks_once_per_prompt(http):
    prompt = f"{uuid.uuid4().hex} " + "The quick brown fox jumps over the lazy dog. " * 4
    first = _usage(http, "/v1/completions", prompt=prompt)
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    again = _usage(http, "/v1/completions", prompt=prompt, n=2)
    # Whole blocks, never the last token (it must run through the models for the first output's logits).
    assert again["prompt_tokens_details"] == {"cached_tokens": (first["prompt_tokens"] - 1) // BLOCK * BLOCK}
    assert again["prompt_tokens_details"]["cached_tokens"] > 0 and again["prompt_tokens"] == first["prompt_tokens"]
    listed = _usage(http, "/v1/completions", prompt=[prompt, prompt])
    assert listed["prompt_tokens_details"]["cached_tokens"] == 2 * again["prompt_tokens_details"]["cached_tokens"]


def test_chat_reports_them_too_and_the_sdk_reads_them(http, client):
    messages = [{"role": "user", "content": f"{uuid.uuid4().hex} tell me about the quick brown fox " * 3}]
    assert _usage(http, "/v1/chat/completions", messages=messages)["prompt_tokens_details"] == {"cached_tokens": 0}
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert answer.usage.prompt_tokens_details.cached_tokens > 0
    assert answer.usage.completion_tokens_details.reasoning_tokens == 0  # no reasoning parser on this server
